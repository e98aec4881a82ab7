# syntax=docker/dockerfile:1.7
#
# The MLflow tracking server of the scaled-out deployment (docker/compose.yaml): PostgreSQL backend
# store, artifacts proxied to S3 (--serve-artifacts), basic auth when MLFLOW_AUTH=basic. It runs the
# project's one launcher, mlflow/start-server.sh (the same script as outside Docker), after
# docker/mlflow-entrypoint.sh has refused placeholder secrets.
#
# Versions: the same uv.lock as the pipeline, so server and clients run the same MLflow. The lock is
# exported in a first stage; the server installs only what it needs (mlflow with its `auth` extra,
# which brings Flask-WTF, psycopg2-binary, boto3) with the whole export as constraints, so each of
# them, and each of their dependencies, is at its locked version; check_lock.py fails the build
# otherwise (pip, setuptools and wheel are the base image's, outside the server's dependencies).
#
# Build context: the repository root; docker/mlflow.Dockerfile.dockerignore sends only what is
# copied below.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11-slim AS lock
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN UV_NO_CACHE=1 uv export --frozen --no-dev --no-hashes --no-emit-project --output-file /requirements.txt

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never
COPY --from=lock /requirements.txt /opt/mlflow-image/requirements.txt
COPY docker/check_lock.py docker/bootstrap.py /opt/mlflow-image/
RUN --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    uv pip install --system --constraint /opt/mlflow-image/requirements.txt \
        "mlflow[auth]" psycopg2-binary boto3 flask-wtf \
    && python /opt/mlflow-image/check_lock.py /opt/mlflow-image/requirements.txt --installed-only \
        --require mlflow --require psycopg2-binary --require boto3 --require flask-wtf \
        --ignore pip --ignore setuptools --ignore wheel
COPY --chmod=0755 mlflow/start-server.sh /opt/mlflow-image/start-server.sh
COPY --chmod=0755 docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --home-dir /home/mlflow --create-home \
        --shell /usr/sbin/nologin mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# No curl in this image: compose's healthcheck calls /health (no login needed) with Python.
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint"]
USER mlflow

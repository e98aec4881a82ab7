# syntax=docker/dockerfile:1.7
#
# The Airflow image of the scaled-out deployment (docker/compose.yaml): API server, scheduler, DAG
# processor, triggerer and the Celery worker of the `default` queue. trainer.Dockerfile (the GPU
# worker) is this image plus the CUDA libraries; the blocks marked [shared:...] are the same text in
# both files, and tests/unit/platform/test_docker.py keeps them so.
#
# Build context: the repository root (`docker compose -f docker/compose.yaml build`, or
# `docker build -f docker/airflow.Dockerfile .`); docker/airflow.Dockerfile.dockerignore sends only
# what is copied below.
#
# How the project is installed. The official image keeps Airflow in a virtual environment at
# /home/airflow/.local (VIRTUAL_ENV, first on PATH) owned by the user `airflow` (uid 50000, gid 0),
# with AIRFLOW_HOME=/opt/airflow. We install into that same environment, as `airflow`:
#   1. `uv export --frozen` turns uv.lock into a fully pinned requirements file (--frozen: the lock is
#      used as it is, never re-resolved) and `uv pip install` installs exactly those versions. They
#      replace the image's versions where both have a package; packages only the image has stay.
#   2. check_lock.py fails the build unless every locked version is the installed one.
#   3. The project (pipelines, models) is installed last, without dependencies, so that editing the
#      code rebuilds one small layer, not the 2 GB of dependencies.
# The pinned uv is the one the Makefile uses (UV_VERSION): it reads this uv.lock's format.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM apache/airflow:3.3.2-python3.11

# [shared:lock] begin
USER root
RUN install -d -o airflow -g 0 -m 0775 /opt/mlops-image /opt/mlops-image/src /opt/mlops
USER airflow
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy
WORKDIR /opt/mlops-image/src
COPY --chown=airflow:0 pyproject.toml uv.lock README.md ./
# uv pip installs into $VIRTUAL_ENV, the image's Airflow environment (/home/airflow/.local).
RUN uv export --frozen --no-dev --no-hashes --no-emit-project \
        --output-file /opt/mlops-image/requirements.txt \
    && uv pip install --requirement /opt/mlops-image/requirements.txt
# [shared:lock] end

# [shared:app] begin
COPY --chown=airflow:0 pipelines ./pipelines
COPY --chown=airflow:0 models ./models
COPY --chown=airflow:0 docker/check_lock.py docker/bootstrap.py /opt/mlops-image/
RUN uv pip install --no-deps . \
    && python /opt/mlops-image/check_lock.py /opt/mlops-image/requirements.txt \
    && python -I -c "import asyncpg, psycopg2, celery, pipelines.platform.orchestration" \
    && (uv pip check || echo "note: uv pip check reports conflicts of packages the base image adds")
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 params.yaml /opt/mlops-image/params.yaml
COPY --chmod=0755 docker/airflow-entrypoint.sh /usr/local/bin/mlops-entrypoint
# The project root is /opt/mlops (the folder of MLOPS_PARAMS): data/, data.dvc, .dvc/ and artifacts/
# live there, in the volume that every Airflow container and the GPU worker share. The entry point
# writes $MLOPS_PARAMS there from /opt/mlops-image/params.yaml at every start (docker/bootstrap.py).
ENV MLOPS_PARAMS=/opt/mlops/params.yaml \
    MLOPS_PARAMS_SOURCE=/opt/mlops-image/params.yaml \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
WORKDIR /opt/airflow
# dumb-init and /entrypoint (database and broker checks, `airflow ...`) are the official image's.
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/usr/local/bin/mlops-entrypoint"]
# [shared:app] end

USER airflow

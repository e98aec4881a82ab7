# syntax=docker/dockerfile:1.7
#
# The GPU training worker: a Celery worker of Airflow that takes only the `gpu` queue, where the
# retrain DAG sends its `train` task (MLOPS_TRAIN_QUEUE=gpu in docker/compose.yaml).
#
# Approach: the Airflow image (airflow.Dockerfile, same base, same lock; the [shared:...] blocks are
# the same text in both files, checked by tests/unit/platform/test_docker.py) plus the CUDA user-space libraries as
# NVIDIA's pip wheels, through TensorFlow's own `and-cuda` extra. The host provides only the NVIDIA
# driver, through the NVIDIA Container Toolkit.
#
# Why not FROM tensorflow/tensorflow:2.21.0-gpu (TensorFlow preinstalled with CUDA), adding the rest of
# the lock without reinstalling tensorflow? Because a Celery worker must run the same Airflow, Python
# and libraries as the scheduler and API server that hand it tasks (the task SDK, the serialized DAGs
# and the execution API versions must match), and that image cannot promise it:
#   - its Python is Ubuntu's python3.11 (TensorFlow's images have shipped 3.11.0rc1, tensorflow issue
#     82529), not the official Airflow image's CPython build; the lock was resolved for, and the
#     test suite runs on, a released 3.11;
#   - its packages live in the system site-packages next to Debian-packaged ones, which pip cannot
#     always replace (the known "Cannot uninstall 'blinker', it is a distutils installed project"
#     when Flask, needed by MLflow, is installed there);
#   - everything the official Airflow image sets up would have to be rebuilt by hand: user 50000 with
#     gid 0, AIRFLOW_HOME, dumb-init, the entrypoint that waits for the database and the broker.
# Trade-offs of this approach, accepted:
#   - the CUDA wheels (nvidia-cublas-cu12, nvidia-cudnn-cu12, ...; about 3 GB) are resolved at build
#     time within the ranges TensorFlow 2.21 declares for its `and-cuda` extra, because uv.lock holds
#     tensorflow without that extra. Every other package stays at its locked version (--constraint,
#     then check_lock.py), and the CUDA versions installed are written to
#     /opt/mlops-image/cuda-wheels.txt. To lock them too, add an optional dependency
#     `gpu = ["tensorflow[and-cuda]==2.21.0"]` to pyproject.toml, `uv lock`, and export with
#     `--extra gpu` here.
#   - the image is larger than the TensorFlow one would be; its lock layers are shared with the
#     Airflow image in the build cache, so the extra build cost is the CUDA layer alone.
#   - XLA (jit_compile) needs ptxas: it comes from the nvidia-cuda-nvcc-cu12 wheel, put on PATH below.

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

# CUDA for TensorFlow, without reinstalling it: tensorflow is already installed at its locked version
# and the whole lock is passed as constraints, so only the `and-cuda` extra's NVIDIA wheels are added.
RUN uv pip install --constraint /opt/mlops-image/requirements.txt "tensorflow[and-cuda]" \
    && uv pip freeze | grep -i '^nvidia-' > /opt/mlops-image/cuda-wheels.txt
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    PATH=/home/airflow/.local/lib/python3.11/site-packages/nvidia/cuda_nvcc/bin:${PATH}

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

# One task at a time: a training job takes the whole GPU (or all of the host's GPUs under
# MirroredStrategy, or `train.workers` local processes under MultiWorkerMirroredStrategy).
CMD ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1"]

USER airflow

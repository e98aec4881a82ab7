#!/usr/bin/env bash
# Entry point of the Airflow and GPU trainer images (airflow.Dockerfile, trainer.Dockerfile), run
# under dumb-init: prepare the container, then hand over to the official image's /entrypoint, which
# waits for the metadata database (and for the Celery broker before `scheduler` and `celery ...`),
# then runs `airflow "$@"` (or bash/python when the command starts with one of them).
set -euo pipefail

# Where the image keeps them (tests/unit/platform/test_docker.py points these at the repository's copies).
bootstrap="${MLOPS_BOOTSTRAP:-/opt/mlops-image/bootstrap.py}"
image_entrypoint="${AIRFLOW_IMAGE_ENTRYPOINT:-/entrypoint}"

# Refuse .env.example placeholders; write $MLOPS_PARAMS (version.remote from $MLOPS_DVC_REMOTE) and,
# in the API server, the auth manager's password file from $AIRFLOW_ADMIN_PASSWORD.
python "$bootstrap" airflow

# The admin password is in the password file now: keep it out of Airflow's environment and out of
# the environment of every task.
unset AIRFLOW_ADMIN_PASSWORD

exec "$image_entrypoint" "$@"

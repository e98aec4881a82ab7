#!/bin/sh
# Entry point of the MLflow tracking server image (mlflow.Dockerfile): refuse the placeholder secrets of
# docker/.env.example, then run the project's one MLflow launcher, mlflow/start-server.sh (copied into
# the image), listening on every interface of the container. Everything comes from the environment
# (docker/compose.yaml, secrets from docker/.env); see mlflow/start-server.sh for the variables:
#   MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_AUTH (basic or none),
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY,
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
# The launcher keeps every secret off the command line, and removes its rendered auth file when the
# server stops (compose's init passes `docker compose stop`'s SIGTERM on to it).
# Extra arguments are passed on to `mlflow server`.
set -eu

# Where the image keeps them (tests/unit/platform/test_docker.py points these at the repository's copies).
bootstrap="${MLOPS_BOOTSTRAP:-/opt/mlflow-image/bootstrap.py}"
launcher="${MLFLOW_LAUNCHER:-/opt/mlflow-image/start-server.sh}"

python "$bootstrap" check-env

MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
export MLFLOW_HOST
exec "$launcher" "$@"

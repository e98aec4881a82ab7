#!/bin/sh
# Entry point of the MLflow tracking server image (mlflow.Dockerfile); everything comes from the
# environment (docker/compose.yaml, secrets from docker/.env):
#   MLFLOW_BACKEND_STORE_URI      runs, experiments, models: postgresql+psycopg2://mlflow:...@postgres/mlflow
#                                 (read by `mlflow server` from the environment, so the password is not
#                                 on the command line)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts: s3://mlflow-artifacts (clients
#                                 upload and download through the server: --serve-artifacts)
#   MLFLOW_AUTH                   basic: users and permissions (--app-name basic-auth); none: no login
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD  the admin account, created on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the basic-auth app
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
# Extra arguments are passed on to `mlflow server`.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?MLFLOW_BACKEND_STORE_URI is not set (postgresql+psycopg2://user:password@host:5432/db)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?MLFLOW_ARTIFACTS_DESTINATION is not set (s3://bucket)}"

# Where the image keeps it (tests/unit/platform/test_docker.py points this at the repository's copy).
bootstrap="${MLOPS_BOOTSTRAP:-/opt/mlflow-image/bootstrap.py}"
python "$bootstrap" check-env

case "${MLFLOW_AUTH:-none}" in
    basic)
        : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more)}"
        : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY}"
        MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$HOME/basic_auth.ini}"
        export MLFLOW_AUTH_CONFIG_PATH
        python "$bootstrap" mlflow-auth-config "$MLFLOW_AUTH_CONFIG_PATH"
        set -- --app-name basic-auth "$@"
        ;;
    none)
        echo "warning: MLFLOW_AUTH=none: the tracking server accepts requests without a login" >&2
        ;;
    *)
        echo "error: MLFLOW_AUTH must be 'basic' or 'none', not '${MLFLOW_AUTH}'" >&2
        exit 64
        ;;
esac

exec mlflow server \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --host 0.0.0.0 \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" \
    "$@"

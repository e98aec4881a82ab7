#!/usr/bin/env bash
# Start the team's MLflow tracking server: PostgreSQL backend store, S3 artifact store served through
# the server (clients need no S3 credentials), optional basic authentication.
#
# Configuration comes from the environment only (no secrets in this repository):
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://user:password@host:5432/mlflow   (required)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix                            (required)
#   MLFLOW_S3_ENDPOINT_URL        S3-compatible endpoint (MinIO, moto...); unset for AWS S3
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   credentials of the artifact store (server side only)
#   MLFLOW_HOST (default 127.0.0.1), MLFLOW_PORT (default 5000), MLFLOW_WORKERS (default 2)
#   MLFLOW_AUTH=basic             turn on basic authentication; then also:
#     MLFLOW_ADMIN_USERNAME, MLFLOW_ADMIN_PASSWORD   the admin account created on first start
#     MLFLOW_AUTH_DATABASE_URI    where users and permissions live (default: the backend store)
#     MLFLOW_FLASK_SERVER_SECRET_KEY                  session signing key
# Clients then set MLFLOW_TRACKING_URI=http://host:port (and MLFLOW_TRACKING_USERNAME/PASSWORD with auth).
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
# The Python that renders the auth config: the one next to the mlflow executable when there is one.
if [[ -z "${MLFLOW_PYTHON:-}" && -x "$(dirname "$(command -v "$MLFLOW_BIN")")/python" ]]; then
    MLFLOW_PYTHON="$(dirname "$(command -v "$MLFLOW_BIN")")/python"
fi

args=(server
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
    --serve-artifacts
    --host "$HOST" --port "$PORT" --workers "$WORKERS")

if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then
    : "${MLFLOW_ADMIN_USERNAME:?set MLFLOW_ADMIN_USERNAME when MLFLOW_AUTH=basic}"
    : "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD when MLFLOW_AUTH=basic}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY when MLFLOW_AUTH=basic}"
    config="$(mktemp -t mlflow-auth-XXXXXX.ini)"
    chmod 600 "$config"
    trap 'rm -f "$config"' EXIT
    # Rendered from the environment at start, so the password never lands in the repository
    # (plain string replacement: any character is safe in the values).
    "${MLFLOW_PYTHON:-python3}" - "$(dirname "$0")/basic_auth.ini.template" "$config" <<'PY'
import os, sys
text = open(sys.argv[1], encoding="utf-8").read()
for placeholder, value in (
    ("@ADMIN_USERNAME@", os.environ["MLFLOW_ADMIN_USERNAME"]),
    ("@ADMIN_PASSWORD@", os.environ["MLFLOW_ADMIN_PASSWORD"]),
    ("@DATABASE_URI@", os.environ.get("MLFLOW_AUTH_DATABASE_URI") or os.environ["MLFLOW_BACKEND_STORE_URI"]),
):
    text = text.replace(placeholder, value)
open(sys.argv[2], "w", encoding="utf-8").write(text)
PY
    export MLFLOW_AUTH_CONFIG_PATH="$config"
    args+=(--app-name basic-auth)
fi

echo "MLflow tracking server on http://$HOST:$PORT (backend: PostgreSQL, artifacts: $MLFLOW_ARTIFACTS_DESTINATION, auth: ${MLFLOW_AUTH:-none})"
exec "$MLFLOW_BIN" "${args[@]}"

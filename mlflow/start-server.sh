#!/usr/bin/env bash
# Start the team's MLflow tracking server: PostgreSQL backend store, S3 artifact store served through
# the server (clients need no S3 credentials), optional basic authentication. The one launcher of the
# project: the MLflow container (docker/mlflow-entrypoint.sh) runs this script too.
#
# Configuration comes from the environment only (no secrets in this repository):
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://user:password@host:5432/mlflow   (required)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix                            (required)
#   MLFLOW_S3_ENDPOINT_URL        S3-compatible endpoint (MinIO, moto...); unset for AWS S3
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   credentials of the artifact store (server side only)
#   MLFLOW_HOST (default 127.0.0.1), MLFLOW_PORT (default 5000), MLFLOW_WORKERS (default 2)
#   MLFLOW_AUTH=basic             turn on basic authentication (none, the default: no login); then also:
#     MLFLOW_ADMIN_USERNAME, MLFLOW_ADMIN_PASSWORD   the admin account created on first start
#       (or MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, the names MLflow itself reads)
#     MLFLOW_AUTH_DATABASE_URI    where users and permissions live (default: the backend store)
#     MLFLOW_AUTH_DEFAULT_PERMISSION                  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#     MLFLOW_FLASK_SERVER_SECRET_KEY                  session signing key
#   MLFLOW_STOP_GRACE_SECONDS (default 20)  after SIGTERM/SIGINT, how long the server may take to stop
# Extra arguments are passed on to `mlflow server`.
# Clients then set MLFLOW_TRACKING_URI=http://host:port (and MLFLOW_TRACKING_USERNAME/PASSWORD with auth).
#
# Secrets never reach a command line (visible to every user in `ps`): `mlflow server` reads the store
# URIs from the environment (its options' environment variables), and the admin account from
# MLFLOW_AUTH_ADMIN_*. The basic-auth file (it holds the auth database URI) is private (0600), and the
# server runs as a child of this script, so the file is removed whenever the server stops: SIGTERM and
# SIGINT are passed on to the server, which is waited for (killed after the grace period).
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
# MLflow 3's job runner (GenAI judge jobs, trace roll-ups; nothing this project uses) starts seven huey
# consumers that spin the CPU and outlive the server when it is stopped: off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
GRACE="${MLFLOW_STOP_GRACE_SECONDS:-20}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
# The Python that renders the auth config: the one next to the mlflow executable when there is one.
if [[ -z "${MLFLOW_PYTHON:-}" ]]; then
    MLFLOW_PYTHON=python3
    mlflow_dir="$(dirname "$(command -v "$MLFLOW_BIN" || echo "$MLFLOW_BIN")")"
    if [[ -x "$mlflow_dir/python" ]]; then
        MLFLOW_PYTHON="$mlflow_dir/python"
    elif command -v python >/dev/null 2>&1; then
        MLFLOW_PYTHON=python
    fi
fi

args=(server --serve-artifacts --host "$HOST" --port "$PORT" --workers "$WORKERS")
config=""
child=""
deadline=""

cleanup() {
    if [[ -n "$config" ]]; then
        rm -f "$config"
    fi
}

stop() {
    if [[ -z "$child" ]]; then
        exit "$2"  # stopped before the server started: nothing to wait for
    fi
    kill -s "$1" "$child" 2>/dev/null || true
    deadline="${deadline:-$((SECONDS + GRACE))}"
}
trap 'stop TERM 143' TERM
trap 'stop INT 130' INT
trap cleanup EXIT

case "${MLFLOW_AUTH:-none}" in
    basic)
        export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-${MLFLOW_ADMIN_USERNAME:-admin}}"
        export MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:-${MLFLOW_ADMIN_PASSWORD:-}}"
        if [[ -z "$MLFLOW_AUTH_ADMIN_PASSWORD" ]]; then
            echo "error: MLFLOW_AUTH=basic needs MLFLOW_ADMIN_PASSWORD (or MLFLOW_AUTH_ADMIN_PASSWORD), 12 characters or more" >&2
            exit 64
        fi
        : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY when MLFLOW_AUTH=basic}"
        config="$(mktemp -t mlflow-auth-XXXXXX.ini)"
        chmod 600 "$config"
        # Rendered from the environment at start (the database URI is read by Python from the
        # environment, never passed as an argument); MLflow reads the file with interpolation, so a
        # literal % (a URL-encoded password) is doubled.
        "$MLFLOW_PYTHON" - "$config" <<'PY'
import configparser, os, sys
uri = os.environ.get("MLFLOW_AUTH_DATABASE_URI") or os.environ["MLFLOW_BACKEND_STORE_URI"]
permission = os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ")
if "\n" in uri or "\r" in uri:
    sys.exit("error: the MLflow auth database URI must be one line")
if permission not in {"READ", "EDIT", "MANAGE", "NO_PERMISSIONS"}:
    sys.exit(f"error: MLFLOW_AUTH_DEFAULT_PERMISSION: unknown permission {permission!r}")
parser = configparser.RawConfigParser()
parser["mlflow"] = {
    "default_permission": permission,
    "database_uri": uri.replace("%", "%%"),
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}
with open(sys.argv[1], "w", encoding="utf-8") as handle:
    handle.write("# Rendered by mlflow/start-server.sh at start; removed when the server stops.\n")
    handle.write("# The admin account comes from MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD, read by MLflow.\n")
    parser.write(handle)
PY
        export MLFLOW_AUTH_CONFIG_PATH="$config"
        args+=(--app-name basic-auth)
        ;;
    none)
        echo "warning: MLFLOW_AUTH=none: the tracking server accepts requests without a login" >&2
        ;;
    *)
        echo "error: MLFLOW_AUTH must be 'basic' or 'none', not '${MLFLOW_AUTH}'" >&2
        exit 64
        ;;
esac

echo "MLflow tracking server on http://$HOST:$PORT (artifacts: $MLFLOW_ARTIFACTS_DESTINATION, auth: ${MLFLOW_AUTH:-none})"
"$MLFLOW_BIN" "${args[@]}" "$@" &
child=$!
# `wait` returns early when a trapped signal arrives; from then on, poll until the server is gone,
# and kill it once the grace period is over.
set +e
while kill -0 "$child" 2>/dev/null; do
    if [[ -z "$deadline" ]]; then
        wait "$child"
    elif ((SECONDS >= deadline)); then
        kill -s KILL "$child" 2>/dev/null
        sleep 0.2
    else
        sleep 0.2
    fi
done
wait "$child"
exit $?

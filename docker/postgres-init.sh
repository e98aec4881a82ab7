#!/usr/bin/env bash
# Run once by the postgres image, on its first start (empty data volume), from
# /docker-entrypoint-initdb.d/: one database and one owner role for Airflow's metadata (also the
# Celery result backend) and one for MLflow's tracking store and registry (and its basic-auth users).
# The passwords come from docker/.env through the container's environment; psql's :'variable' quotes
# them as SQL literals. Changing a password later in docker/.env does not change it here: use
# ALTER ROLE ... PASSWORD, or start from an empty volume.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
    --set airflow_password="$AIRFLOW_DB_PASSWORD" \
    --set mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL

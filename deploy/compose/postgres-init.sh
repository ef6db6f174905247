#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
# One instance, two databases with their own roles: `prefect` for the Prefect server,
# `lineage` for the governance lineage. Neither role can connect to the other's database.
# Passwords come from the environment and reach SQL as psql variables, never spliced in.
set -eu

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${LINEAGE_DB_PASSWORD:?LINEAGE_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v lineage_password="$LINEAGE_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE ROLE lineage LOGIN PASSWORD :'lineage_password';
CREATE DATABASE prefect OWNER prefect;
CREATE DATABASE lineage OWNER lineage;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
REVOKE ALL ON DATABASE lineage FROM PUBLIC;
SQL

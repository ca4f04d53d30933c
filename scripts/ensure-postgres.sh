#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers at $DATABASE_URL's host (127.0.0.1:5432 by
# default) and that the named database exists. Starts the Debian cluster if it is down.
# Prints nothing but errors; safe to run repeatedly.
set -euo pipefail
url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
host=127.0.0.1 port=5432
if ! pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  fi
  for _ in $(seq 1 30); do pg_isready -q -h "$host" -p "$port" && break; sleep 1; done
  pg_isready -q -h "$host" -p "$port" || { echo "PostgreSQL is not reachable at $host:$port" >&2; exit 1; }
fi
db="${url##*/}"; db="${db%%\?*}"
if [ -n "$db" ] && [ "$db" != postgres ]; then
  exists=$(psql -h "$host" -p "$port" -U postgres -tAc "select 1 from pg_database where datname = '$db'" postgres)
  [ "$exists" = 1 ] || psql -q -h "$host" -p "$port" -U postgres -c "create database \"$db\"" postgres
fi

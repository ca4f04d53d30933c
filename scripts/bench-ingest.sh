#!/usr/bin/env bash
# Ingest benchmark (issue: foundation): a fresh database, a release build, the blaze
# Synthea fixtures over FHIR REST vs a bare COPY of the same JSON. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
db="chartline_bench_$$"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
bash scripts/ensure-postgres.sh
trap 'psql -q -h 127.0.0.1 -U postgres -c "drop database if exists \"$db\"" postgres' EXIT
cargo build --locked --release -q -p chartline
RUST_LOG=warn "${CARGO_TARGET_DIR:-target}/release/chartline" bench-ingest "$@"

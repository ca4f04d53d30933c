#!/usr/bin/env bash
# The main job on one machine: set up, start Chartline in one process, ingest the shipped
# Synthea patients over FHIR REST, and print what was stored for one patient.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/chartline_demo}"
export RUST_LOG="${RUST_LOG:-warn}"
bash scripts/ensure-postgres.sh
bash scripts/install-models.sh
cargo run --locked -q -p chartline -- demo "$@"

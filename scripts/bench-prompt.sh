#!/usr/bin/env bash
# BuildPrompt benchmark (issue: timeline): a fresh database with the blaze fixtures, a
# release build, p50/p99 of BuildPrompt for the largest patient vs one indexed SELECT.
set -euo pipefail
cd "$(dirname "$0")/.."
db="chartline_bench_prompt_$$"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
bash scripts/ensure-postgres.sh
bash scripts/install-models.sh >/dev/null
trap 'psql -q -h 127.0.0.1 -U postgres -c "drop database if exists \"$db\"" postgres' EXIT
cargo build --locked --release -q -p chartline
RUST_LOG=warn "${CARGO_TARGET_DIR:-target}/release/chartline" bench-prompt "$@"

#!/usr/bin/env bash
# The test suite: unit, PostgreSQL and real-model tests, end to end. Each PostgreSQL test
# gets a fresh database from #[sqlx::test] on the server at DATABASE_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
bash scripts/ensure-postgres.sh
bash scripts/install-models.sh
cargo test --workspace --locked "$@"

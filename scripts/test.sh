#!/usr/bin/env bash
# Run the test suite against local PostgreSQL + Tansu.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test pipeline -- --nocapture).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Explicit `up`: a bare `source` would hand our cargo arguments to services.sh.
source scripts/services.sh up
exec cargo test --locked "$@"

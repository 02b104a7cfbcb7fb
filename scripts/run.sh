#!/usr/bin/env bash
# Run the worker locally against PostgreSQL + Tansu; arguments go to `allocation-worker run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/services.sh up
exec cargo run --release --locked -- run "$@"

#!/usr/bin/env bash
# Run the test suite against local PostgreSQL + Tansu: the worker's tests and
# the developer tools' (tools/, whose package a bare `cargo test` in the
# repository's root leaves out), hence --workspace.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test services end_to_end:: -- --nocapture).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/prerequisites.sh
prerequisites_cargo
# Build prerequisites, PostgreSQL and the broker, each only when missing.
# Explicit `up`: a bare `source` would hand our cargo arguments to services.sh.
source scripts/services.sh up
# Alert rules and their unit tests; also installs promtool, which the
# end-to-end metrics test uses to check the exposition format.
bash deploy/prometheus/check.sh
exec cargo test --locked --workspace "$@"

#!/usr/bin/env bash
# The benchmark of BENCHMARKS.md, in one command.
#
#   scripts/bench.sh            the standard benchmark workload (a few minutes)
#   scripts/bench.sh --small    a tiny run for CI: checks the end state only,
#                               exits non-zero if it is wrong
#
# Starts PostgreSQL and Tansu if needed (scripts/services.sh), builds the
# release binary (or uses WORKER_BIN if set), then runs the developer tools'
# benchmark (tools/examples/bench.rs, package allocation-tools), which starts
# `allocation-worker run` on a fresh database and fresh topics.
# Other arguments go to the example (--seed N, --keep, --products N,
# --history N, --soak-rate R --soak-duration D; see BENCHMARKS.md). For a
# soak, start a broker that holds a long run first:
#   eval "$(scripts/long-run-broker.sh)" && scripts/bench.sh --soak-rate 1000 --soak-duration 30m
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Explicit `up`: a bare `source` would hand our arguments to services.sh.
source scripts/services.sh up >/dev/null
if [ -z "${WORKER_BIN:-}" ]; then
    cargo build --release --locked --bin allocation-worker
    export WORKER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/allocation-worker"
fi
exec cargo run --release --locked -p allocation-tools --example bench -- "$@"

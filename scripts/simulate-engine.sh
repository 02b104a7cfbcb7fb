#!/usr/bin/env bash
# The deterministic simulations of the engine and of the relay
# (docs/design.md, "Simulation", "Simulation: the relay"), many seeds at
# once. Needs no service: in-memory fakes, one thread, simulated time.
#
#   scripts/simulate-engine.sh                   the seeds CI runs (2,000 engine, 1,000 relay)
#   scripts/simulate-engine.sh --seeds 100000    more (about 40 s a thousand, debug build)
#   scripts/simulate-engine.sh --seeds 5000 --from 2000   the engine's next 5,000
#   scripts/simulate-engine.sh --seed 179        one seed (its failure message gives it)
#   scripts/simulate-engine.sh --seed 179 --log allocation_worker=debug   with its log
#   scripts/simulate-engine.sh --release ...     in a release build (faster per seed)
#
# A failing seed stops the run and prints the command that replays it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
profile=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) export SIMULATION_SEEDS="${2:?--seeds needs a number}"; shift 2 ;;
        --from) export SIMULATION_FIRST_SEED="${2:?--from needs a number}"; shift 2 ;;
        --seed) export SIMULATION_SEED="${2:?--seed needs a number}"; shift 2 ;;
        --log) export SIMULATION_LOG="${2:?--log needs a filter}"; shift 2 ;;
        --release) profile=(--release); shift ;;
        -h|--help) usage ;;
        *) echo "simulate-engine.sh: unknown argument $1" >&2; usage ;;
    esac
done
source scripts/prerequisites.sh
prerequisites_cargo
# The simulations only (engine:: and relay::); `conformance` needs services.
exec cargo test --locked "${profile[@]}" --test simulation -- --nocapture engine:: relay::

#!/usr/bin/env bash
# Run the worker locally against PostgreSQL + Tansu, with the default topics
# created; arguments go to `allocation-worker run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The toolchain first: a missing one fails in a second, not after installs.
source scripts/prerequisites.sh
prerequisites_cargo
# Build prerequisites, PostgreSQL and the broker, each only when missing.
source scripts/services.sh up
py=python3
python3 -c 'import confluent_kafka' 2>/dev/null || py=.run/venv/bin/python
"$py" scripts/create-topics.py
# A short session timeout: a restarted worker rejoins its group in seconds.
export KAFKA_PROPERTIES="${KAFKA_PROPERTIES:-session.timeout.ms=6000,heartbeat.interval.ms=1000}"
exec cargo run --release --locked -- run "$@"

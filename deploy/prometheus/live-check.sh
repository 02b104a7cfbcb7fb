#!/usr/bin/env bash
# Live check of the alerting setup: the real Prometheus server (Debian's
# `prometheus` package) scrapes a running allocation-worker and evaluates
# alerts.yml. Unlike check.sh (promtool on files), it needs PostgreSQL and
# the development broker, which it starts with scripts/services.sh.
#
#   bash deploy/prometheus/live-check.sh
#
# Starts the worker (WORKER_BIN, default target/release/allocation-worker,
# built when missing) on a free port in a fresh consumer group, log in
# .run/live-check-worker.log, and waits for /readyz to answer 200; then
# `prometheus` itself (never the Debian service) scraping and evaluating every
# second, job allocation-worker (the name the `up` alerts select), and polls
# its API until the target is up, every rule of alerts.yml was evaluated
# with health ok, allocation_ready is 1, and AllocationWorkerAbsent, ...Down
# and ...NotReady are inactive (other active alerts are listed, not checked:
# they depend on what is on the shared broker). Both are stopped on exit;
# PostgreSQL and the broker are left running. Deadlines in seconds:
# LIVE_CHECK_READY_TIMEOUT (/readyz, 90), LIVE_CHECK_PROMETHEUS_TIMEOUT (60).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../.."
log() { printf 'live-check: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/allocation-live-check.XXXXXX")
pids=()
cleanup() {
    local status=$? pid
    trap - EXIT
    if [ "$status" != 0 ]; then
        for file in "$tmp/prometheus.log" .run/live-check-worker.log; do
            [ ! -s "$file" ] || { log "last lines of $file:"; tail -n 15 "$file" | sed 's/^/    /' >&2; }
        done
    fi
    # SIGTERM, then SIGKILL after 30 s (the worker's SHUTDOWN_TIMEOUT is 20 s).
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        timeout 30 tail --pid="$pid" -f /dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
    [ "$status" = 0 ] || log "FAILED (exit $status) after ${SECONDS}s"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

bash "$here/install-prometheus.sh" prometheus
prometheus --version 2>&1 | head -n1 >&2

# Sourced, so DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS land in this shell.
# shellcheck source=/dev/null
source scripts/services.sh up >&2 || die "scripts/services.sh up failed"
[ -n "${DATABASE_URL:-}" ] && [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ] || die "scripts/services.sh exported no DATABASE_URL or KAFKA_BOOTSTRAP_SERVERS"
# The interpreter scripts/run.sh uses for the topics.
py=python3
python3 -c 'import confluent_kafka' 2>/dev/null || py=.run/venv/bin/python
"$py" scripts/create-topics.py || die "could not create the topics"

worker_bin="${WORKER_BIN:-$PWD/target/release/allocation-worker}"
[ -x "$worker_bin" ] || cargo build --release --locked || die "cargo build --release --locked failed"
worker_addr="127.0.0.1:$(free_port)"
mkdir -p .run
log "starting $worker_bin run on $worker_addr (log .run/live-check-worker.log)"
HTTP_ADDR="$worker_addr" KAFKA_GROUP_ID="live-check-$(date +%s)-$RANDOM" \
    KAFKA_PROPERTIES="session.timeout.ms=6000,heartbeat.interval.ms=1000" \
    "$worker_bin" run >.run/live-check-worker.log 2>&1 </dev/null &
pids+=($!)

prometheus_addr="127.0.0.1:$(free_port)"
printf '%s\n' 'global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}' \
    "rule_files: [\"$here/alerts.yml\"]" \
    "scrape_configs: [{job_name: allocation-worker, static_configs: [{targets: [\"$worker_addr\"]}]}]" >"$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml" >/dev/null || die "promtool rejects the temporary Prometheus config"
log "starting prometheus on $prometheus_addr"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="$prometheus_addr" >"$tmp/prometheus.log" 2>&1 </dev/null &
pids+=($!)

# Polls until every condition holds or a deadline passes; prints what is
# still missing when one does.
python3 - "$worker_addr" "$prometheus_addr" "$here/alerts.yml" "${LIVE_CHECK_READY_TIMEOUT:-90}" \
    "${LIVE_CHECK_PROMETHEUS_TIMEOUT:-60}" "${pids[@]}" <<'PY'
import json, os, re, sys, time, urllib.parse, urllib.request

worker, prom, rules_file, ready_timeout, prom_timeout, *pids = sys.argv[1:]
expected = len(re.findall(r"^ *- (?:alert|record): *\S", open(rules_file).read(), re.M))
MUST_BE_INACTIVE = {"AllocationWorkerAbsent", "AllocationWorkerDown", "AllocationWorkerNotReady"}
ZERO = "0001-01-01T00:00:00Z"

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

def api(path):
    return json.loads(get(f"http://{prom}/api/v1{path}")[1])["data"]

def prometheus_problems():
    problems = []
    targets = [t for t in api("/targets")["activeTargets"] if t["labels"].get("instance") == worker]
    if not targets or targets[0]["health"] != "up":
        problems.append(f"target {worker} not up: {targets[0].get('lastError') if targets else 'not listed'}")
    groups = [g for g in api("/rules")["groups"] if os.path.realpath(g["file"]) == os.path.realpath(rules_file)]
    rules = [r for g in groups for r in g["rules"]]
    if len(rules) != expected:
        problems.append(f"{len(rules)} rules loaded from {rules_file}, which has {expected}")
    problems += [f"rule {r['name']}: not evaluated yet" if r.get("lastEvaluation", ZERO) == ZERO
                 else f"rule {r['name']}: health {r['health']} {r.get('lastError', '')}"
                 for r in rules if r.get("lastEvaluation", ZERO) == ZERO or r.get("health") != "ok"]
    active = [(r["name"], a["state"]) for r in rules if r["type"] == "alerting" for a in r.get("alerts", [])]
    problems += [f"{name} is {state} although the worker is up and ready" for name, state in active if name in MUST_BE_INACTIVE]
    ready = [s["value"][1] for s in api("/query?" + urllib.parse.urlencode({"query": "allocation_ready"}))["result"]
             if s["metric"].get("instance") == worker]
    if ready != ["1"]:
        problems.append(f"allocation_ready of {worker} is {ready or 'no series'}, want 1")
    return problems, active

def poll(what, timeout, check):
    deadline, last = time.monotonic() + float(timeout), None
    while True:
        dead = [pid for pid in pids if not os.path.exists(f"/proc/{pid}")]
        if dead:
            sys.exit(f"live-check: ERROR: process {dead} exited while waiting for {what}")
        try:
            problems = check()
        except Exception as e:  # not listening yet
            problems = [f"{what}: {e}"]
        if not problems or time.monotonic() > deadline:
            return problems
        if problems != last:
            print(f"live-check: waiting: {'; '.join(problems)}", file=sys.stderr)
            last = problems
        time.sleep(0.5)

status = lambda: [] if get(f"http://{worker}/readyz")[0] == 200 else ["/readyz is not 200"]
if poll("the worker's /readyz", ready_timeout, status):
    sys.exit(f"live-check: ERROR: http://{worker}/readyz did not answer 200 within {ready_timeout}s")
result = {}
def prometheus_check():
    problems, result["active"] = prometheus_problems()
    return problems
problems = poll("Prometheus", prom_timeout, prometheus_check)
if problems:
    sys.exit("live-check: ERROR: within {}s: {}".format(prom_timeout, "; ".join(problems)))
print(f"  target {worker} up; {expected} rules of {rules_file} evaluated, health ok; allocation_ready 1; "
      f"{', '.join(sorted(MUST_BE_INACTIVE))} inactive; other alerts active: {result['active'] or 'none'}")
PY
printf '\nlive-check: passed in %ss (Prometheus %s, worker %s)\n' "$SECONDS" "$prometheus_addr" "$worker_addr"

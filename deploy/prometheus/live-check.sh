#!/usr/bin/env bash
# Live check of the alerting setup: the real Prometheus server (Debian's
# `prometheus` package) scrapes a running allocation-worker and evaluates
# alerts.yml. Unlike check.sh (promtool on files only), this needs PostgreSQL
# and the development Kafka broker, which it starts with scripts/services.sh.
#
#   bash deploy/prometheus/live-check.sh
#
# 1. `source scripts/services.sh up`, create the default topics;
# 2. start target/release/allocation-worker (built with `cargo build --release
#    --locked` when missing) on a free local port, in a fresh consumer group,
#    log in .run/live-check-worker.log, and wait for /readyz to answer 200;
# 3. start `prometheus` directly (never the Debian service) on a free local
#    port with a temporary config: scrape and evaluate every 1s, job
#    `allocation-worker` (the name the `up` alerts select) with the worker as
#    static target, rule_files = this directory's alerts.yml;
# 4. poll its HTTP API until the target is up, every rule group has been
#    evaluated with every rule's health "ok", `allocation_ready` is 1, and the
#    alerts on the target and its readiness (AllocationWorkerAbsent, ...Down,
#    ...NotReady) are inactive; other active alerts are listed, not checked.
#
# Prometheus and the worker are stopped and the temporary files removed on
# exit, whatever happens; PostgreSQL and the broker are left running
# (`scripts/services.sh stop` stops the broker). Exit status non-zero, with a
# line saying what failed, on any failure. Deadlines (seconds) can be changed
# with LIVE_CHECK_READY_TIMEOUT (worker /readyz, default 90) and
# LIVE_CHECK_PROMETHEUS_TIMEOUT (Prometheus checks, default 60).
set -euo pipefail

started=$SECONDS
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
rules="$here/alerts.yml"
ready_timeout="${LIVE_CHECK_READY_TIMEOUT:-90}"
prometheus_timeout="${LIVE_CHECK_PROMETHEUS_TIMEOUT:-60}"

log() { printf 'live-check: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
step() { printf '\n--- %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- cleanup -----------------------------------------------------------------
tmp=
worker_pid=
worker_started=
prometheus_pid=

# SIGTERM, then SIGKILL after $3 seconds. Only pids this script started.
stop_process() {
    local name=$1 pid=$2 grace=$3 deadline
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not exit within ${grace}s of SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [ "$status" != 0 ] && [ -n "$tmp" ] && [ -s "$tmp/prometheus.log" ]; then
        log "last lines of the Prometheus log:"
        tail -n 15 "$tmp/prometheus.log" | sed 's/^/    /' >&2
    fi
    if [ "$status" != 0 ] && [ -n "$worker_started" ] && [ -s .run/live-check-worker.log ]; then
        log "last lines of the worker's log (.run/live-check-worker.log):"
        tail -n 15 .run/live-check-worker.log | sed 's/^/    /' >&2
    fi
    stop_process prometheus "$prometheus_pid" 15
    # The worker finishes in-flight work within SHUTDOWN_TIMEOUT (20s).
    stop_process allocation-worker "$worker_pid" 30
    [ -z "$tmp" ] || rm -rf "$tmp"
    if [ "$status" != 0 ]; then
        log "FAILED (exit $status) after $((SECONDS - started))s"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tmp="$(mktemp -d "${TMPDIR:-/tmp}/allocation-live-check.XXXXXX")"

# --- helpers -----------------------------------------------------------------
# A free TCP port on 127.0.0.1 (the kernel's choice; bound again right after).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# HTTP GET: prints "<status code> <body>" (code 000 when nothing answered).
http_get() {
    local url=$1
    if command -v curl >/dev/null 2>&1; then
        local out
        out="$(curl -sS -m 5 -o "$tmp/http-body" -w '%{http_code}' "$url" 2>/dev/null)" || true
        printf '%s %s' "${out:-000}" "$(tr -d '\n' <"$tmp/http-body" 2>/dev/null)"
        rm -f "$tmp/http-body"
    else
        python3 - "$url" <<'PY'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except Exception:
    code, body = 0, b""
print(f"{code:03d} {body.decode(errors='replace').strip()}", end="")
PY
    fi
}

# --- Prometheus server binary --------------------------------------------------
install_prometheus() {
    log "prometheus not found: installing Debian's prometheus package"
    # The package's maintainer scripts would start the service; a policy-rc.d
    # answering 101 forbids that (invoke-rc.d, deb-systemd-invoke). Only ours
    # is removed afterwards.
    local policy=/usr/sbin/policy-rc.d ours='' status=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        ours=1
    fi
    as_root apt-get update -qq || status=$?
    if [ "$status" = 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus >&2 || status=$?
    fi
    [ -z "$ours" ] || as_root rm -f "$policy"
    [ "$status" = 0 ] || die "could not install the prometheus package (apt-get exit $status)"
    # Whatever the package may still have started, stop it and keep it from
    # starting at boot: this script runs the binary itself.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
        local pid
        pid="$(cat /run/prometheus/prometheus.pid 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            log "the package started the prometheus service (pid $pid): stopping it"
            as_root /etc/init.d/prometheus stop >&2 || true
        fi
    fi
}

step "Prometheus server"
command -v prometheus >/dev/null 2>&1 || install_prometheus
command -v prometheus >/dev/null 2>&1 || die "no prometheus binary on PATH after installing the package"
prometheus --version 2>&1 | head -n1 >&2

# --- PostgreSQL, broker, topics ------------------------------------------------
step "PostgreSQL and the Kafka broker (scripts/services.sh up)"
# Sourced, so DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS land in this shell.
# shellcheck source=/dev/null
source scripts/services.sh up >&2 || die "scripts/services.sh up failed"
if [ -z "${DATABASE_URL:-}" ] || [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
    die "scripts/services.sh did not export DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS"
fi

step "default topics (scripts/create-topics.py)"
# The same interpreter choice as scripts/run.sh.
py=python3
python3 -c 'import confluent_kafka' 2>/dev/null || py=.run/venv/bin/python
"$py" scripts/create-topics.py || die "could not create the topics"

# --- the worker ----------------------------------------------------------------
step "allocation-worker"
# WORKER_BIN: an already built binary (CI passes the debug build it has).
worker_bin="${WORKER_BIN:-$root/target/release/allocation-worker}"
if [ ! -x "$worker_bin" ]; then
    log "$worker_bin missing: cargo build --release --locked"
    cargo build --release --locked || die "cargo build --release --locked failed"
fi
[ -x "$worker_bin" ] || die "$worker_bin still missing after the build"

worker_addr="127.0.0.1:$(free_port)"
group="live-check-$(date +%s)-$RANDOM"
mkdir -p .run
log "starting $worker_bin run: HTTP_ADDR=$worker_addr KAFKA_GROUP_ID=$group (log: .run/live-check-worker.log)"
HTTP_ADDR="$worker_addr" KAFKA_GROUP_ID="$group" \
    KAFKA_PROPERTIES="session.timeout.ms=6000,heartbeat.interval.ms=1000" \
    "$worker_bin" run >.run/live-check-worker.log 2>&1 </dev/null &
worker_pid=$!
worker_started=1

deadline=$((SECONDS + ready_timeout))
while :; do
    if ! kill -0 "$worker_pid" 2>/dev/null; then
        wait "$worker_pid" && code=0 || code=$?
        worker_pid=
        die "the worker exited (status $code) before /readyz answered 200; its log is .run/live-check-worker.log"
    fi
    answer="$(http_get "http://$worker_addr/readyz")"
    [ "${answer%% *}" = 200 ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
        die "worker /readyz did not answer 200 within ${ready_timeout}s; last answer: HTTP ${answer%% *} '${answer#* }'"
    fi
    sleep 0.5
done
log "worker /readyz: HTTP 200 '${answer#* }' at $(date -u +%H:%M:%S) UTC, $((SECONDS - started))s after start"

# --- Prometheus ----------------------------------------------------------------
step "Prometheus scraping the worker and evaluating $rules"
prometheus_addr="127.0.0.1:$(free_port)"
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s

rule_files:
  - $rules

scrape_configs:
  - job_name: allocation-worker
    metrics_path: /metrics
    static_configs:
      - targets: ["$worker_addr"]
EOF
if command -v promtool >/dev/null 2>&1; then
    promtool check config "$tmp/prometheus.yml" >"$tmp/promtool.out" 2>&1 \
        || { cat "$tmp/promtool.out" >&2; die "promtool rejects the temporary Prometheus config"; }
fi
mkdir "$tmp/data"
log "starting prometheus on $prometheus_addr (config and data in $tmp)"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="$prometheus_addr" >"$tmp/prometheus.log" 2>&1 </dev/null &
prometheus_pid=$!

expected_rules="$(grep -cE '^ *- (alert|record): *[A-Za-z0-9_:]+' "$rules")"

# Polls the API until every condition holds or the deadline passes; prints the
# summary on success, what is still missing on failure. Exits 3 if one of the
# two processes died.
python3 - "$prometheus_addr" "$worker_addr" "$rules" "$expected_rules" "$prometheus_timeout" \
    "$prometheus_pid" "$worker_pid" <<'PY'
import json, os, sys, time, urllib.parse, urllib.request

prom, worker, rules_file, expected_rules, timeout, prom_pid, worker_pid = sys.argv[1:]
expected_rules, timeout = int(expected_rules), float(timeout)
ZERO = "0001-01-01T00:00:00Z"
MUST_BE_INACTIVE = {"AllocationWorkerAbsent", "AllocationWorkerDown", "AllocationWorkerNotReady"}
base = f"http://{prom}/api/v1"

def say(msg):
    print(f"live-check: {msg}", file=sys.stderr, flush=True)

def alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False

def api(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        doc = json.load(r)
    if doc.get("status") != "success":
        raise RuntimeError(f"{path}: {doc}")
    return doc["data"]

def check():
    """(ok, problems, summary lines)"""
    problems, summary = [], []

    targets = [t for t in api("/targets?state=active")["activeTargets"]
               if t["labels"].get("job") == "allocation-worker"
               and t["labels"].get("instance") == worker]
    if not targets:
        problems.append(f"no active target job=allocation-worker instance={worker}")
    elif targets[0]["health"] != "up":
        t = targets[0]
        problems.append(f"target {t['scrapeUrl']} health {t['health']!r}"
                        + (f", last error: {t['lastError']}" if t.get("lastError") else ""))
    else:
        t = targets[0]
        summary.append(f"target {t['scrapeUrl']} (job allocation-worker): health up, "
                       f"last scrape {t['lastScrapeDuration'] * 1000:.1f} ms")

    groups = api("/rules")["groups"]
    ours = [g for g in groups if os.path.realpath(g["file"]) == os.path.realpath(rules_file)]
    if not ours:
        problems.append(f"no rule group loaded from {rules_file}")
    n_rules, bad, names = 0, [], []
    for g in ours:
        if g.get("lastEvaluation", ZERO) == ZERO:
            bad.append(f"group {g['name']} not evaluated yet")
        for r in g["rules"]:
            n_rules += 1
            names.append(r["name"])
            if r.get("lastEvaluation", ZERO) == ZERO:
                bad.append(f"rule {r['name']} not evaluated yet")
            elif r.get("health") != "ok":
                bad.append(f"rule {r['name']} health {r.get('health')!r}: {r.get('lastError', '')}")
    if ours and n_rules != expected_rules:
        bad.append(f"{n_rules} rules loaded, {rules_file} has {expected_rules}")
    problems += bad
    if ours and not bad:
        summary.append(f"{n_rules} rules in {len(ours)} group(s) from {rules_file} evaluated, "
                       f"health ok: {', '.join(names)}")
        active = [(r["name"], f"{r['name']}{{{','.join(f'{k}={v}' for k, v in a['labels'].items() if k not in ('alertname', 'severity'))}}} {a['state']}")
                  for g in ours for r in g["rules"] if r["type"] == "alerting" for a in r.get("alerts", [])]
        # With the worker up and ready, the target and readiness alerts must
        # be inactive once evaluated on scraped data (AllocationWorkerAbsent
        # is pending until the first evaluation after the first scrape). The
        # others depend on what is on the shared broker: reported, not checked.
        wrong = [text for name, text in active if name in MUST_BE_INACTIVE]
        if wrong:
            problems.append("alerts active although the worker is up and ready: " + "; ".join(wrong))
        else:
            summary.append(f"{', '.join(sorted(MUST_BE_INACTIVE))}: inactive")
            others = [text for name, text in active if name not in MUST_BE_INACTIVE]
            summary.append("other alerts pending or firing: " + ("; ".join(others) if others else "none"))

    result = api("/query?" + urllib.parse.urlencode({"query": "allocation_ready"}))["result"]
    values = [(s["metric"].get("instance"), s["value"][1]) for s in result]
    if values != [(worker, "1")]:
        problems.append(f"query allocation_ready returned {values or 'no series'}, want [({worker!r}, '1')]")
    else:
        summary.append(f"query allocation_ready{{instance=\"{worker}\"}} = 1")
    return not problems, problems, summary

deadline = time.monotonic() + timeout
started = time.monotonic()
last = None
while True:
    for name, pid in (("prometheus", prom_pid), ("allocation-worker", worker_pid)):
        if not alive(pid):
            say(f"ERROR: {name} (pid {pid}) exited while waiting for the checks")
            sys.exit(3)
    try:
        ok, problems, summary = check()
    except Exception as e:  # Prometheus not listening yet, or a malformed answer
        ok, problems, summary = False, [f"Prometheus API not answering: {e}"], []
    if ok:
        say(f"all checks passed after {time.monotonic() - started:.1f}s of polling Prometheus")
        for line in summary:
            print(f"  {line}")
        sys.exit(0)
    if problems != last:
        say("waiting: " + "; ".join(problems))
        last = problems
    if time.monotonic() >= deadline:
        say(f"ERROR: not all checks passed within {timeout:g}s:")
        for p in problems:
            say(f"  - {p}")
        sys.exit(1)
    time.sleep(0.5)
PY

printf '\nlive-check: passed in %ss (Prometheus %s, worker %s)\n' \
    "$((SECONDS - started))" "$prometheus_addr" "$worker_addr"

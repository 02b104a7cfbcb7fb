#!/usr/bin/env bash
# The README's two commands on a fresh machine: a container made from a
# locally debootstrapped Debian image, given only the README's prerequisites
# (a Rust toolchain from rustup, git, root), and a fresh clone of this
# repository's HEAD. Fails if either command fails.
#
#   .ci/fresh-machine.sh [--dist bookworm|trixie] [--part full|run]
#
# (.ci/run runs it for bookworm, `--part run`.)
#   run    scripts/run.sh until the worker is ready (/readyz 200) and has
#          allocated one order line sent through the broker, then stopped
#   full   the same, then a representative part of scripts/test.sh: the
#          service check (nothing left to install), the promtool checks, and
#          ${FRESH_TEST_ARGS:-one end-to-end test} (default)
#
# FRESH_EXPORT_BINARY=PATH: copies the release binary scripts/run.sh built
# (HEAD, compiled in the clean container) to PATH on the host as soon as the
# worker it ran has passed, before the test part; .ci/run makes the worker
# image from it and tests that image meanwhile.
# FRESH_READY_TIMEOUT (seconds, default 1800) bounds the wait for the worker:
# the cold release build, on a busy machine, is most of it.
# Docker: installs docker.io and starts dockerd when no engine answers (and
# stops the one it started). No image can be pulled here, so the base image
# is made with debootstrap and kept as the tag allocation-worker-base:<dist>
# (the root file system also stays under /var/cache/allocation-worker), which
# later runs on the machine reuse.
#
# What of the host goes in, at run time only (nothing of it is in the
# repository): its Rust toolchain (~/.rustup and ~/.cargo/bin, read-only:
# rustup cannot download toolchains here), the extra CA certificates of
# /usr/local/share/ca-certificates, pip's configuration (/etc/pip.conf,
# ~/.config/pip, ~/.pip, PIP_* variables) and cargo's (~/.cargo/config.toml),
# so that the container reaches the package registries as the host does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dist=bookworm
part=full
while [ $# -gt 0 ]; do
    case $1 in
        --dist) dist=$2; shift 2 ;;
        --part) part=$2; shift 2 ;;
        *) echo "usage: $0 [--dist bookworm|trixie] [--part full|run]" >&2; exit 2 ;;
    esac
done
case $part in full | run) ;; *) echo "--part: full or run" >&2; exit 2 ;; esac

log() { printf '[fresh-machine %s +%ss] %s\n' "$dist" "$SECONDS" "$*" >&2; }
container=allocation-worker-fresh-$dist-$$
test_args=${FRESH_TEST_ARGS:---release --test services end_to_end::serves_health_metrics_and_the_read_model_over_http}

# --- a Docker engine and the base image (shared with scripts/images.sh) -----
source scripts/docker-base.sh --functions
docker_engine_up

cleanup() {
    local status=$?
    docker rm -f "$container" >/dev/null 2>&1 || true
    rm -rf "${staging:-}"
    docker_engine_stop
    exit "$status"
}
trap cleanup EXIT

image=$(docker_base_image "$dist")
log "base image $image"

# --- what of the host goes in ------------------------------------------------
# The toolchain rust-toolchain.toml pins, made on the host: the container
# gets ~/.rustup read-only.
source scripts/prerequisites.sh
prerequisites_toolchain
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -x "$cargo_bin/cargo" ] && [ -d "$rustup_home/toolchains" ] \
    || { log "ERROR: no rustup toolchain at $rustup_home with $cargo_bin/cargo"; exit 1; }
staging=$(mktemp -d)
mkdir -p "$staging/ca" "$staging/pip" "$staging/cargo"
cp -L /usr/local/share/ca-certificates/*.crt "$staging/ca/" 2>/dev/null || true
[ -f /etc/pip.conf ] && cp -L /etc/pip.conf "$staging/pip/etc-pip.conf"
[ -f "$HOME/.config/pip/pip.conf" ] && cp -L "$HOME/.config/pip/pip.conf" "$staging/pip/config-pip.conf"
[ -f "$HOME/.pip/pip.conf" ] && cp -L "$HOME/.pip/pip.conf" "$staging/pip/dot-pip.conf"
for f in config.toml config; do
    [ -f "${CARGO_HOME:-$HOME/.cargo}/$f" ] && cp -L "${CARGO_HOME:-$HOME/.cargo}/$f" "$staging/cargo/$f"
done
# The repository as a clone would get it: HEAD, committed work only.
git bundle create "$staging/repo.bundle" HEAD >/dev/null 2>&1
env_args=()
while IFS= read -r name; do env_args+=(-e "$name"); done < <(compgen -e | grep -E '^(PIP_|RUSTUP_AUTO_INSTALL$|SSL_CERT_FILE$|SSL_CERT_DIR$|REQUESTS_CA_BUNDLE$|CARGO_HTTP_|CARGO_NET_|CARGO_REGISTRIES_)' || true)

log "starting container $container"
# --init: a real PID 1 reaps the processes the checks leave behind.
# FRESH_CPU_SHARES: the container's CPU weight (1024 is a process's), lower
# when it runs beside other work that should go first.
docker run -d --init --name "$container" --cpu-shares "${FRESH_CPU_SHARES:-1024}" \
    -v "$rustup_home:/root/.rustup:ro" -v "$cargo_bin:/root/.cargo/bin:ro" \
    -v "$staging:/host:ro" \
    "${env_args[@]}" -e RUSTUP_HOME=/root/.rustup -e CARGO_HOME=/root/.cargo \
    -e PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    -e CARGO_TERM_COLOR=never -e DEBIAN_FRONTEND=noninteractive \
    "$image" sleep infinity >/dev/null
in_container() { docker exec -i -e FRESH_READY_TIMEOUT "$container" bash -euo pipefail -c "$1"; }

in_container '
    mkdir -p /usr/local/share/ca-certificates ~/.cargo
    for f in /host/ca/*.crt; do [ ! -f "$f" ] || cp "$f" /usr/local/share/ca-certificates/; done
    [ ! -f /host/pip/etc-pip.conf ] || cp /host/pip/etc-pip.conf /etc/pip.conf
    [ ! -f /host/pip/config-pip.conf ] || { mkdir -p ~/.config/pip; cp /host/pip/config-pip.conf ~/.config/pip/pip.conf; }
    [ ! -f /host/pip/dot-pip.conf ] || { mkdir -p ~/.pip; cp /host/pip/dot-pip.conf ~/.pip/pip.conf; }
    for f in /host/cargo/*; do [ ! -f "$f" ] || cp "$f" ~/.cargo/; done
'
log "prerequisites of the README: git (the Rust toolchain is the host's)"
in_container 'apt-get update -qq && apt-get install -y -qq --no-install-recommends git >/dev/null 2>&1'
in_container 'git -c advice.detachedHead=false -c init.defaultBranch=main clone -q /host/repo.bundle /root/allocation-worker && git -C /root/allocation-worker log --oneline -1'
log "container ready: $(in_container '. /etc/os-release; echo "$PRETTY_NAME"'), $(in_container 'cargo --version')"

# --- scripts/run.sh -----------------------------------------------------------
log "scripts/run.sh (log in the container: /root/run.log)"
run_started=$SECONDS
# setsid: run.sh (then cargo, then the worker) in a process group of its own,
# to stop as a whole; the group's leader writes its id.
in_container '
    printf "%s\n" "echo \$\$ >/root/run.pgid" "cd /root/allocation-worker" "exec scripts/run.sh" >/root/start-run.sh
    setsid nohup bash /root/start-run.sh >/root/run.log 2>&1 </dev/null &
'
# Polls /readyz; fails as soon as run.sh has exited (its build or set-up
# failed), or after the deadline, with the end of its log.
in_container '
    deadline=$((SECONDS + ${FRESH_READY_TIMEOUT:-1800}))
    until [ -s /root/run.pgid ]; do
        [ "$SECONDS" -lt 30 ] || { echo "scripts/run.sh did not start" >&2; exit 1; }
        sleep 0.2
    done
    group=$(cat /root/run.pgid)
    while :; do
        if ! kill -0 -- "-$group" 2>/dev/null; then
            echo "scripts/run.sh exited before the worker was ready:" >&2; tail -n 40 /root/run.log >&2; exit 1
        fi
        if (exec 3<>/dev/tcp/127.0.0.1/9464) 2>/dev/null && [ -x /root/allocation-worker/.run/venv/bin/python ] \
            && /root/allocation-worker/.run/venv/bin/python -c "
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(\"http://127.0.0.1:9464/readyz\", timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
"; then break; fi
        if [ "$SECONDS" -ge "$deadline" ]; then echo "worker not ready after ${FRESH_READY_TIMEOUT:-1800} s" >&2; tail -n 40 /root/run.log >&2; exit 1; fi
        sleep 1
    done
'
log "worker ready after $((SECONDS - run_started)) s of scripts/run.sh"

# One message in, its decision out: a batch and an order line through the
# broker, then the read model over HTTP and the Allocated event on its topic.
in_container '/root/allocation-worker/.run/venv/bin/python - <<"PY"
import json, time, urllib.error, urllib.request
from confluent_kafka import Consumer, Producer

producer = Producer({"bootstrap.servers": "127.0.0.1:9092", "acks": "all"})
producer.produce("erp.batch-created", key="FRESH-LAMP",
                 value=json.dumps({"ref": "fresh-batch-1", "sku": "FRESH-LAMP", "qty": 10, "eta": None}))
producer.produce("erp.allocation-required", key="FRESH-LAMP",
                 value=json.dumps({"orderid": "fresh-order-1", "sku": "FRESH-LAMP", "qty": 3}))
assert producer.flush(30) == 0, "messages not delivered"

deadline = time.monotonic() + 120
while True:
    try:
        body = json.load(urllib.request.urlopen("http://127.0.0.1:9464/allocations/fresh-order-1", timeout=5))
        if body == [{"sku": "FRESH-LAMP", "batchref": "fresh-batch-1"}]:
            break
        raise SystemExit(f"unexpected read model: {body}")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    if time.monotonic() > deadline:
        raise SystemExit("fresh-order-1 not allocated within 120 s")
    time.sleep(0.5)

consumer = Consumer({"bootstrap.servers": "127.0.0.1:9092", "group.id": "fresh-machine-check",
                     "auto.offset.reset": "earliest", "enable.auto.commit": False})
consumer.subscribe(["allocation.allocated"])
deadline = time.monotonic() + 60
seen = None
while seen is None and time.monotonic() < deadline:
    message = consumer.poll(1.0)
    if message is None or message.error():
        continue
    event = json.loads(message.value())
    if event.get("orderid") == "fresh-order-1":
        seen = event
consumer.close()
if seen != {"orderid": "fresh-order-1", "sku": "FRESH-LAMP", "qty": 3, "batchref": "fresh-batch-1"}:
    raise SystemExit(f"no Allocated event for fresh-order-1 (last seen: {seen})")
print("allocated:", seen)
PY'
log "one order line allocated: read model and Allocated event"
# Stop the worker as an operator would; it must exit by itself.
in_container '
    group=$(cat /root/run.pgid)
    kill -TERM -- "-$group"
    for _ in $(seq 300); do kill -0 -- "-$group" 2>/dev/null || exit 0; sleep 0.1; done
    echo "the worker did not stop within 30 s of SIGTERM" >&2; tail -n 20 /root/run.log >&2; exit 1
'
log "scripts/run.sh: done in $((SECONDS - run_started)) s"
if [ -n "${FRESH_EXPORT_BINARY:-}" ]; then
    # Under a temporary name, then renamed: whoever waits for the file
    # never sees half of it.
    docker cp "$container:/root/allocation-worker/target/release/allocation-worker" "$FRESH_EXPORT_BINARY.part"
    mv "$FRESH_EXPORT_BINARY.part" "$FRESH_EXPORT_BINARY"
    log "release binary copied to $FRESH_EXPORT_BINARY"
fi

# --- scripts/test.sh ----------------------------------------------------------
if [ "$part" = full ]; then
    test_started=$SECONDS
    log "scripts/test.sh $test_args"
    in_container "cd /root/allocation-worker && scripts/test.sh $test_args 2>&1 | tail -n 80"
    log "scripts/test.sh: done in $((SECONDS - test_started)) s"
fi
log "passed"

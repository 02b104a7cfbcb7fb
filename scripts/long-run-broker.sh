#!/usr/bin/env bash
# A Kafka broker that holds a long run (BENCHMARKS.md, "A broker for long
# runs"): Tansu 0.6.0 built from crates.io with its PostgreSQL storage, on
# the PostgreSQL of scripts/services.sh, listening on 127.0.0.1:9094. The
# development broker (Tansu from PyPI, memory storage, 9092) is left alone:
# its memory storage slows as partitions grow and stalled a 12-minute run.
#
#   scripts/long-run-broker.sh [up]   install what is missing, start, wait until usable
#   scripts/long-run-broker.sh stop   stop the broker this script started
#
# `up` prints `export KAFKA_BOOTSTRAP_SERVERS=...` and `export
# BENCH_BROKER_DATABASE=...` (the bench counts that database's PostgreSQL
# backends as the broker's CPU), so
#   eval "$(scripts/long-run-broker.sh)" && scripts/bench.sh --soak-rate 1000 --soak-duration 30m
# runs a soak on it. Progress goes to stderr.
#
# The first `up` builds Tansu: `cargo install tansu --version 0.6.0 --locked
# --no-default-features --features postgres` (about 8 minutes on 2 idle
# cores; without --locked it does not compile). Set TANSU_CARGO_TARGET_DIR to
# keep its build directory elsewhere.
#
# The schema. Tansu's PostgreSQL engine does not create its tables, and the
# schema file of Tansu's repository is not in any published crate. The crate
# tansu-storage 0.6.0 does ship the same tables as SQLite DDL (src/ddl/, which
# its SQLite engines run at start), and its PostgreSQL engine runs the same
# statements (src/sql/) on them. So this script translates that DDL, read
# from cargo's registry after the install, to PostgreSQL types: the types are
# those the engine binds (src/pg.rs: ids INT4 except a producer's INT8,
# offsets INT8, attributes and producer epochs INT2, timestamps TIMESTAMPTZ,
# a topic's uuid UUID, a group's e_tag UUID and detail JSON), plus the
# column `record.transaction_id` that the engine's own fetch statement reads
# (see _lrb_schema). Nothing of Tansu's is copied into this repository.
#
# Environment: TANSU_PORT (9094), TANSU_DATABASE (tansu_long_run, created on
# the server of scripts/services.sh, owned by its role `allocation`),
# TANSU_BIN (a tansu 0.6.0 built with the postgres feature already; default
# .run/tansu-pg/bin/tansu, built if missing).

LRB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LRB_RUN="$LRB_ROOT/.run"
LRB_PORT="${TANSU_PORT:-9094}"
LRB_DB="${TANSU_DATABASE:-tansu_long_run}"
LRB_VERSION=0.6.0
LRB_BIN="${TANSU_BIN:-$LRB_RUN/tansu-pg/bin/tansu}"
LRB_PIDFILE="$LRB_RUN/tansu-pg.pid"
LRB_LOG="$LRB_RUN/tansu-pg.log"

_lrb_log() { echo "long-run-broker: $*" >&2; }

_lrb_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$LRB_PORT") 2>/dev/null; }

# The crate's SQLite DDL, in file order, as PostgreSQL.
_lrb_schema() {
    local ddl="$1"
    local f
    # SQLite takes a foreign key to a table created later; PostgreSQL does
    # not, so the files that refer to `record` (header) come after the rest.
    {
        for f in "$ddl"/*.sql; do
            if ! grep -q 'references record' "$f"; then cat "$f"; echo; fi
        done
        for f in "$ddl"/*.sql; do
            if grep -q 'references record' "$f"; then cat "$f"; echo; fi
        done
    } | awk '
        # Strip comments (none of the DDL has "--" inside a string).
        { sub(/--.*/, "") }
        /create table if not exists/ {
            table = $6; sub(/\(.*/, "", table)
            print; next
        }
        {
            line = $0
            n = split(line, w, /[ \t]+/)
            # w[1] is empty (the lines are indented); w[2] the column.
            col = w[2]; key = table "." col
            if (col == "id" && line ~ /primary key autoincrement/) {
                type = (table == "producer") ? "bigserial" : "serial"
                sub(/integer primary key autoincrement/, type " primary key", line)
            } else if (key in override) {
                sub(/^[ \t]*[a-z_"]+[ \t]+[a-z]+/, "    " col " " override[key], line)
            }
            gsub(/ blob/, " bytea", line)
            # last_updated and created_at: datetime, or text in one table.
            sub(/ (datetime|text) default current_timestamp/, " timestamptz default current_timestamp", line)
            print line
        }
        BEGIN {
            override["producer_epoch.producer"] = "bigint"
            override["producer_epoch.epoch"] = "smallint"
            override["txn.producer"] = "bigint"
            override["record.offset_id"] = "bigint"
            override["record.attributes"] = "smallint"
            override["record.producer_id"] = "bigint"
            override["record.producer_epoch"] = "smallint"
            override["record.timestamp"] = "timestamptz"
            override["header.offset_id"] = "bigint"
            override["watermark.low"] = "bigint"
            override["watermark.high"] = "bigint"
            override["consumer_offset.committed_offset"] = "bigint"
            override["consumer_offset.timestamp"] = "timestamptz"
            override["txn_offset_commit_tp.committed_offset"] = "bigint"
            override["txn_produce_offset.offset_start"] = "bigint"
            override["txn_produce_offset.offset_end"] = "bigint"
            override["txn_detail.started_at"] = "timestamptz"
            override["topic.uuid"] = "uuid"
            override["topic.is_internal"] = "boolean"
            override["consumer_group_detail.e_tag"] = "uuid"
            override["consumer_group_detail.detail"] = "json"
        }'
    # The one statement of the PostgreSQL engine of its own
    # (src/pg/record_fetch.sql) reads `record.transaction_id <
    # pg_snapshot_xmin(pg_current_snapshot())`: a record is served once the
    # transaction that wrote it is older than every running one, so a fetch
    # never skips an offset a slower producer has yet to commit. So the
    # column is the writer's transaction id, an xid8, set by default (the
    # engine writes records by COPY without it).
    echo "alter table record add column if not exists transaction_id xid8 not null default pg_current_xact_id();"
    # SQLite gives every table a rowid; here `header` would have no index at
    # all, and the engine looks up a record's headers by (topition,
    # offset_id) once per record it serves (src/sql/header_fetch.sql): a
    # scan of every header ever written, per record. Without it, a soak at
    # 500 msg/s (debug worker, a loaded machine) was served at 36-61 msg/s;
    # with it, at 499 msg/s. `watermark` is read and
    # updated by topition on every produce and fetch.
    echo "create index if not exists header_topition_offset_id on header (topition, offset_id);"
    echo "create index if not exists watermark_topition on watermark (topition);"
}

_lrb_up() (
    set -euo pipefail
    cd "$LRB_ROOT"
    # PostgreSQL (and the development broker, which stays as it is).
    # shellcheck source=scripts/services.sh
    source scripts/services.sh up >/dev/null
    mkdir -p "$LRB_RUN"

    if ! [ -x "$LRB_BIN" ] || [ "$("$LRB_BIN" --version 2>/dev/null)" != "tansu $LRB_VERSION" ]; then
        if [ -n "${TANSU_BIN:-}" ]; then
            _lrb_log "ERROR: TANSU_BIN=$TANSU_BIN is not tansu $LRB_VERSION"
            exit 1
        fi
        _lrb_log "building Tansu $LRB_VERSION with PostgreSQL storage from crates.io (about 8 minutes; log: .run/tansu-pg-install.log)"
        CARGO_TARGET_DIR="${TANSU_CARGO_TARGET_DIR:-$LRB_RUN/tansu-pg-target}" \
            cargo install tansu --version "$LRB_VERSION" --locked \
            --no-default-features --features postgres \
            --root "$LRB_RUN/tansu-pg" >"$LRB_RUN/tansu-pg-install.log" 2>&1 \
            || { tail -n 30 "$LRB_RUN/tansu-pg-install.log" >&2; exit 1; }
    fi

    # The DDL of the tansu-storage crate that cargo just used.
    local ddl=''
    local dir
    for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-storage-"$LRB_VERSION"/src/ddl; do
        [ -f "$dir/040-record.sql" ] && ddl="$dir"
    done
    if [ -z "$ddl" ]; then
        _lrb_log "fetching the tansu-storage $LRB_VERSION sources (for its DDL)"
        local tmp
        tmp="$(mktemp -d)"
        printf '[package]\nname = "tansu-ddl"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ntansu-storage = { version = "=%s", default-features = false }\n' "$LRB_VERSION" >"$tmp/Cargo.toml"
        mkdir "$tmp/src" && : >"$tmp/src/lib.rs"
        (cd "$tmp" && cargo fetch -q) >&2
        rm -rf "$tmp"
        for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-storage-"$LRB_VERSION"/src/ddl; do
            [ -f "$dir/040-record.sql" ] && ddl="$dir"
        done
        [ -n "$ddl" ] || { _lrb_log "ERROR: no tansu-storage-$LRB_VERSION/src/ddl in cargo's registry"; exit 1; }
    fi

    local admin_url="$DATABASE_URL"
    local url="${DATABASE_URL%%/allocation\?*}/$LRB_DB?sslmode=disable"
    if [ "$(psql "$admin_url" -XqAtc "select 1 from pg_database where datname = '$LRB_DB'")" != 1 ]; then
        _lrb_log "creating database $LRB_DB"
        psql "$admin_url" -Xqc "create database $LRB_DB" >&2
    fi
    _lrb_schema "$ddl" | PGOPTIONS="-c client_min_messages=warning" psql "$url" -Xq -v ON_ERROR_STOP=1 >&2

    if ! _lrb_port_open; then
        _lrb_log "starting Tansu with PostgreSQL storage on 127.0.0.1:$LRB_PORT (log: .run/tansu-pg.log)"
        # setsid+nohup: the broker outlives this script; the child writes
        # its own pid because setsid may fork. $$ is the inner shell's.
        # shellcheck disable=SC2016
        setsid nohup sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$LRB_PIDFILE" \
            "$LRB_BIN" broker --listener-url "tcp://127.0.0.1:$LRB_PORT" \
            --advertised-listener-url "tcp://127.0.0.1:$LRB_PORT" \
            --storage-engine "$url" \
            >>"$LRB_LOG" 2>&1 </dev/null &
        local deadline=$((SECONDS + 30))
        until _lrb_port_open; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                _lrb_log "ERROR: port $LRB_PORT not open after 30 s"
                tail -n 20 "$LRB_LOG" >&2
                exit 1
            fi
            sleep 0.2
        done
    fi
    echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$LRB_PORT"
    echo "export BENCH_BROKER_DATABASE=$LRB_DB"
)

_lrb_stop() {
    local pid
    [ -f "$LRB_PIDFILE" ] || { _lrb_log "no .run/tansu-pg.pid; nothing to stop"; return 0; }
    pid="$(cat "$LRB_PIDFILE")"
    # A recycled pid may be someone else's.
    if [ -n "$pid" ] && grep -qa tansu "/proc/$pid/cmdline" 2>/dev/null; then
        _lrb_log "stopping Tansu (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$LRB_PIDFILE"
}

case "${1:-up}" in
    up | start) _lrb_up ;;
    stop) _lrb_stop ;;
    schema)
        # For inspection: the PostgreSQL schema this script would apply.
        set -euo pipefail
        for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-storage-"$LRB_VERSION"/src/ddl; do
            _lrb_schema "$d"
            exit
        done
        ;;
    *) _lrb_log "usage: $0 [up|stop|schema]"; exit 2 ;;
esac

#!/usr/bin/env bash
# A Docker engine that answers, and a local Debian base image, on a machine
# where no image can be pulled from a registry.
#
#   scripts/docker-base.sh [bookworm|trixie]     prints the base image's tag
#   source scripts/docker-base.sh --functions    defines the functions below
#
#   docker_engine_up         installs docker.io and starts dockerd when no
#                            engine answers; sets DOCKER_BASE_STARTED_DOCKERD
#                            to the pid of a dockerd it started (empty when
#                            one was already running), so the caller can
#                            stop it: docker_engine_stop
#   docker_base_image DIST   makes allocation-worker-base:DIST, once per
#                            machine: `debootstrap --variant=minbase` into
#                            /var/cache/allocation-worker/rootfs-DIST (kept,
#                            so a lost tag is re-imported in seconds), then
#                            `docker import`; prints the tag
#
# Run directly, it leaves a dockerd it started running (the images it made
# need it). Needs root (apt-get, dockerd, debootstrap).
#
# scripts/images.sh and .ci/fresh-machine.sh share this, so one cache
# serves them all.

DOCKER_BASE_CACHE=${DOCKER_BASE_CACHE:-/var/cache/allocation-worker}
DOCKER_BASE_DOCKERD_LOG=${DOCKER_BASE_DOCKERD_LOG:-/var/log/allocation-worker-dockerd.log}
DOCKER_BASE_STARTED_DOCKERD=

_docker_base_log() { printf '[docker-base +%ss] %s\n' "$SECONDS" "$*" >&2; }

_docker_base_apt_install() {
    # Another apt (a helper, CI step) may hold the lock: wait for it.
    apt-get -o DPkg::Lock::Timeout=300 update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
            --no-install-recommends "$@" >&2
}

docker_engine_answers() { docker info >/dev/null 2>&1; }

docker_engine_up() {
    docker_engine_answers && return 0
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        _docker_base_log "installing docker.io"
        _docker_base_apt_install docker.io || return
    fi
    docker_engine_answers && return 0
    _docker_base_log "starting dockerd (log: $DOCKER_BASE_DOCKERD_LOG)"
    # setsid + nohup: the engine outlives the terminal of whoever started it.
    setsid nohup dockerd >>"$DOCKER_BASE_DOCKERD_LOG" 2>&1 </dev/null &
    DOCKER_BASE_STARTED_DOCKERD=$!
    local deadline=$((SECONDS + 60))
    until docker_engine_answers; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            _docker_base_log "ERROR: dockerd did not answer within 60 s"
            tail -n 20 "$DOCKER_BASE_DOCKERD_LOG" >&2
            return 1
        fi
        sleep 0.5
    done
}

docker_engine_stop() {
    local pid=$DOCKER_BASE_STARTED_DOCKERD
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    DOCKER_BASE_STARTED_DOCKERD=
}

docker_base_image() {
    local dist=${1:-bookworm}
    local image=allocation-worker-base:$dist rootfs=$DOCKER_BASE_CACHE/rootfs-$dist
    if ! docker image inspect "$image" >/dev/null 2>&1; then
        if [ ! -f "$rootfs/.complete" ]; then
            command -v debootstrap >/dev/null 2>&1 || {
                _docker_base_log "installing debootstrap"
                _docker_base_apt_install debootstrap || return
            }
            _docker_base_log "debootstrap --variant=minbase $dist (log: $DOCKER_BASE_CACHE/debootstrap-$dist.log)"
            rm -rf "$rootfs" && mkdir -p "$DOCKER_BASE_CACHE" || return
            debootstrap --variant=minbase "$dist" "$rootfs" http://deb.debian.org/debian \
                >"$DOCKER_BASE_CACHE/debootstrap-$dist.log" 2>&1 \
                || { tail -n 20 "$DOCKER_BASE_CACHE/debootstrap-$dist.log" >&2; return 1; }
            touch "$rootfs/.complete"
        fi
        _docker_base_log "importing $rootfs as $image"
        tar -C "$rootfs" --exclude=./.complete -c . | docker import - "$image" >/dev/null || return
    fi
    echo "$image"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-bookworm}" in
        bookworm | trixie) ;;
        *) echo "usage: $0 [bookworm|trixie]" >&2; exit 2 ;;
    esac
    docker_engine_up
    docker_base_image "${1:-bookworm}"
fi

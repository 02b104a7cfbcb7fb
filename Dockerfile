# allocation-worker container image.
#
#   docker build --build-arg REVISION=$(git rev-parse --short HEAD) -t allocation-worker .
#   docker run --rm -e DATABASE_URL=... -e KAFKA_BOOTSTRAP_SERVERS=... -p 9464:9464 allocation-worker
#
# Runs as an unprivileged user, works with a read-only root filesystem, and
# listens for HTTP (/metrics, /healthz, /readyz, /allocations/{orderid}) on
# 0.0.0.0:9464. `CMD` is `run`; pass `migrate` to apply the migrations and exit.
#
# Stages: `runtime` (the base, the user, the entrypoint: everything but the
# binary), `builder` (cargo build --release), and the image, `runtime` with
# the binary. The runtime stage comes first so that `--target runtime` builds
# nothing else, even with the classic builder (which builds every stage
# before the target): CI puts a release binary it has already built, in a
# clean Debian 12, into that stage (scripts/images.sh --binary) instead of
# compiling the crate a second time.

# The Rust toolchain: the channel of rust-toolchain.toml, which the builder
# stage copies in as well (deploy/check_dockerfile.py checks they agree).
ARG RUST_VERSION=1.95.0
# The base images. Users keep the official ones; a machine that cannot pull
# them passes local stand-ins (scripts/images.sh does):
#   --build-arg BUILDER_IMAGE=... --build-arg RUNTIME_IMAGE=...
# For a reproducible build, pin both by digest, the form
#   --build-arg BUILDER_IMAGE=rust:1.95.0-bookworm@sha256:<64 hex digits>
#   --build-arg RUNTIME_IMAGE=debian:bookworm-slim@sha256:<64 hex digits>
# with the digests your registry serves for those tags
# (`docker buildx imagetools inspect rust:1.95.0-bookworm`, or `docker pull`
# then `docker image inspect --format '{{index .RepoDigests 0}}'`); see
# deploy/README.md "Container image". The defaults carry no digest: none
# could be read where this file is checked.
ARG BUILDER_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- runtime: everything the image has but the binary -------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# ca-certificates for TLS to PostgreSQL and Kafka (it brings libssl3 too);
# glibc and zlib, the binary's other shared libraries, are in the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 allocation \
 && useradd --system --uid 10001 --gid allocation --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin allocation

# In a container the HTTP endpoints must listen beyond loopback.
ENV HTTP_ADDR=0.0.0.0:9464
EXPOSE 9464

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Exec form: the worker is PID 1 and receives SIGTERM itself; it finishes
# in-flight work within SHUTDOWN_TIMEOUT (20s by default) and exits 0.
ENTRYPOINT ["allocation-worker"]
CMD ["run"]

# OCI labels (https://specs.opencontainers.org/image-spec/annotations/):
# scripts/images.sh fills them from git and Cargo.toml; by hand,
#   --build-arg REVISION=$(git rev-parse HEAD) --build-arg VERSION=0.1.0
#   --build-arg CREATED=$(git log -1 --format=%cI) --build-arg SOURCE=<repository URL>
# CREATED is the commit's time, not the build's, so that two builds of one
# commit are labelled alike. Last in the stage: they change at every commit.
ARG RUNTIME_IMAGE
ARG SOURCE=https://github.com/example/allocation-worker
ARG REVISION=unknown
ARG VERSION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="allocation-worker" \
      org.opencontainers.image.description="Allocation service worker: Kafka in, PostgreSQL state, Kafka out" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"

# --- build --------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder

# rdkafka-sys builds librdkafka from its bundled source with the default
# ./configure && make (not CMake, which only its `cmake-build` feature uses):
# that needs bash, make, a C and a C++ compiler, and pkg-config with zlib's
# headers (the `libz` feature links the system zlib). The rust image already
# has them; listing them keeps the build working if the base image slims down.
# libssl-dev is there for when the `ssl` feature of rdkafka is enabled (TLS and
# SASL SCRAM to the brokers); the runtime image already has libssl3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, in their own layer, so editing the sources does not
# rebuild librdkafka and the other crates: build them against empty sources.
# rust-toolchain.toml first: rustup (in the official image) builds with the
# toolchain it names, and downloads it if the image has another.
# The workspace's other members (the test support crate, the developer
# tools) only by their manifests: cargo loads them with the workspace, and
# Cargo.lock holds their dependencies, but only the worker is built.
COPY rust-toolchain.toml Cargo.toml Cargo.lock ./
COPY tests/support/Cargo.toml ./tests/support/
COPY tools/Cargo.toml ./tools/
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin allocation-worker \
 && rm -rf src

COPY src ./src
COPY migrations ./migrations
COPY build.rs ./
# The git commit, for allocation_build_info{revision} and the first log line:
# the context has no .git, so pass it, e.g.
#   docker build --build-arg REVISION=$(git rev-parse --short HEAD) -t allocation-worker .
ARG REVISION=unknown
# The copied sources can be older than the placeholder build: make sure cargo
# rebuilds the crate itself. sqlx::migrate! embeds ./migrations at compile time.
RUN touch src/main.rs src/lib.rs \
 && ALLOCATION_WORKER_REVISION="$REVISION" cargo build --release --locked --bin allocation-worker \
 && install -D -m 0755 target/release/allocation-worker /out/allocation-worker

# --- the image: the runtime with the binary ------------------------------------
FROM runtime
COPY --from=builder /out/allocation-worker /usr/local/bin/allocation-worker

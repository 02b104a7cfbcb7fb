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

ARG RUST_VERSION=1
# The base images. Users keep the official ones; a machine that cannot pull
# them passes local stand-ins (scripts/images.sh does):
#   --build-arg BUILDER_IMAGE=... --build-arg RUNTIME_IMAGE=...
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
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
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

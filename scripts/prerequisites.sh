#!/usr/bin/env bash
# The system packages that building, running and testing allocation-worker
# need, installed with apt when missing. Sourced by scripts/services.sh, so
# scripts/run.sh and scripts/test.sh install them too; runs alone as well:
#
#   scripts/prerequisites.sh          install what is missing
#
# What it assumes (the README's "Prerequisites"): Debian or Ubuntu (apt-get),
# root or sudo, and a Rust toolchain from rustup. What it installs, each only
# when its check fails:
#
#   build-essential   cc, c++ and make: rdkafka builds librdkafka from source
#   pkg-config        how openssl-sys finds OpenSSL
#   libssl-dev        OpenSSL headers: rdkafka's TLS/SASL (its `ssl` feature)
#   ca-certificates   cargo and pip download over HTTPS
#   python3-venv      the private Python environment of the broker (Tansu)
#                     and of the witness clients (confluent-kafka)
#
# services.sh adds PostgreSQL; deploy/prometheus/check.sh, which
# scripts/test.sh runs, adds promtool (Debian's prometheus package).
# Progress goes to stderr. Safe to source: strict mode only applies inside
# subshells, so the caller's shell options are left alone.

_prereq_log() { echo "prerequisites: $*" >&2; }

# Root on CI and in containers; sudo for a developer as a normal user.
_prereq_as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _prereq_log "ERROR: '$*' needs root: run as root, or install sudo"
        return 1
    fi
}

# apt-get install, with one `apt-get update` per process: a fresh machine has
# no package lists, and a stale list can name files the mirror no longer has.
_PREREQ_APT_UPDATED=
# Each step checks its status itself: callers use it in `||` lists, where
# bash ignores `set -e`.
_prereq_apt_install() (
    if ! command -v apt-get >/dev/null 2>&1; then
        _prereq_log "ERROR: no apt-get: on a distribution other than Debian or Ubuntu, install the equivalents of: $*"
        exit 1
    fi
    _prereq_log "installing $*"
    if [ -z "$_PREREQ_APT_UPDATED" ]; then
        _prereq_as_root apt-get update -qq >&2 || exit
    fi
    # No prompts; --no-install-recommends keeps a fresh machine small (the
    # recommended extras of build-essential and PostgreSQL are not needed);
    # another apt-get at work (an unattended upgrade) is waited for.
    _prereq_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "$@" >&2
)

# apt_install in the caller's process, so the update happens once.
prereq_apt_install() {
    _prereq_apt_install "$@" || return
    _PREREQ_APT_UPDATED=1
}

# The packages of the list above whose check fails.
_prereq_missing() {
    local missing=()
    { command -v cc && command -v c++ && command -v make; } >/dev/null 2>&1 \
        || missing+=(build-essential)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    # Checked through pkg-config as openssl-sys does; without pkg-config,
    # by the header Debian's libssl-dev installs.
    if command -v pkg-config >/dev/null 2>&1; then
        pkg-config --exists openssl || missing+=(libssl-dev)
    else
        [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
    fi
    [ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
    # Debian's python3 lacks ensurepip, without which `python3 -m venv` fails.
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    echo "${missing[@]}"
}

# Installs every missing prerequisite; fails with the apt error otherwise.
prerequisites_install() {
    local missing
    missing=$(_prereq_missing)
    [ -z "$missing" ] && return 0
    # Word splitting wanted: package names have no spaces.
    # shellcheck disable=SC2086
    prereq_apt_install $missing || return
    missing=$(_prereq_missing)
    if [ -n "$missing" ]; then
        _prereq_log "ERROR: still missing after apt-get install: $missing"
        return 1
    fi
}

# cargo on PATH: rustup's installer only adds ~/.cargo/bin for login shells,
# so a shell opened before the install lacks it. No toolchain at all is an
# error naming the fix: rustup cannot be installed by apt.
prerequisites_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck source=/dev/null
        source "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || {
        _prereq_log "ERROR: no cargo: install the Rust toolchain with rustup (https://rustup.rs), then open a new shell"
        return 1
    }
    prerequisites_toolchain
}

# The toolchain rust-toolchain.toml pins (channel = "X.Y.Z"), which rustup
# otherwise downloads at the first cargo command. Where the machine's
# default toolchain is that very version (a machine that cannot download
# toolchains has only its default), the pinned name is made a link to it;
# otherwise rustup installs it. Nothing to do without rustup or when the
# toolchain is there.
prerequisites_toolchain() {
    command -v rustup >/dev/null 2>&1 || return 0
    local file want home default triple have
    file="$(dirname "${BASH_SOURCE[0]}")/../rust-toolchain.toml"
    want=$(sed -n 's/^channel *= *"\(.*\)".*/\1/p' "$file" 2>/dev/null || true)
    [ -n "$want" ] || return 0
    home=${RUSTUP_HOME:-$HOME/.rustup}
    default=$(rustup default 2>/dev/null | awk '{print $1}' || true)
    triple=${default#*-}
    [ -n "$default" ] && [ ! -e "$home/toolchains/$want-$triple" ] || return 0
    have=$("$home/toolchains/$default/bin/rustc" --version 2>/dev/null | awk '{print $2}' || true)
    if [ "$have" = "$want" ]; then
        _prereq_log "rust-toolchain.toml pins $want: linking it to the default toolchain $default, which is $have"
        ln -s "$default" "$home/toolchains/$want-$triple"
    else
        _prereq_log "rust-toolchain.toml pins $want; the default toolchain is ${have:-unknown}: rustup toolchain install $want"
        rustup toolchain install "$want" --profile minimal -c rustfmt -c clippy || {
            _prereq_log "ERROR: no Rust $want (rust-toolchain.toml) and it cannot be installed here"
            return 1
        }
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    prerequisites_install
    exit
fi

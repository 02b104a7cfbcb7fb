#!/usr/bin/env bash
# Installs Debian's prometheus package (the server and promtool) when the
# command given is missing, without letting the package start the server:
#
#   bash deploy/prometheus/install-prometheus.sh promtool|prometheus
#
# check.sh needs promtool, live-check.sh the server, which it runs itself.
set -euo pipefail
! command -v "${1:?promtool or prometheus}" >/dev/null || exit 0
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
echo "installing Debian's prometheus package (promtool, the server)" >&2
# A policy-rc.d answering 101 keeps the maintainer scripts from starting the
# service (invoke-rc.d, deb-systemd-invoke); only ours is removed afterwards.
ours=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod 755 /usr/sbin/policy-rc.d && ours=1
fi
status=0
as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends prometheus >&2 || status=$?
[ -z "$ours" ] || as_root rm -f /usr/sbin/policy-rc.d
[ "$status" = 0 ] || { echo "install-prometheus: apt-get failed (exit $status)" >&2; exit "$status"; }
# Enabled at boot by the package on systemd machines: not wanted.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

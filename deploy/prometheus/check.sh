#!/usr/bin/env bash
# Checks the Prometheus configuration and alerting rules of allocation-worker:
#
#   promtool check config prometheus.yml             (compose scrape config)
#   promtool check config prometheus-kubernetes.yml  (Kubernetes example)
#   promtool check rules  alerts.yml
#   promtool test rules   alerts.test.yml            (unit tests of every alert)
#   the Grafana dashboard's queries, as rules: promtool check rules
#
# plus: every alert is tested firing and not firing, has a runbook section
# in deploy/README.md and a `runbook_url` to it on the placeholder base, and
# render-alerts.sh (which puts your base there) gives valid rules, and the
# PrometheusRule object of deploy/k8s is exactly what render-alerts.sh
# --prometheusrule makes of alerts.yml. Installs Debian's `prometheus` package (which brings
# promtool) when promtool is missing, without letting the package start the
# Prometheus server. Exit status non-zero on any failure. Usage:
#
#   bash deploy/prometheus/check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

log() { printf 'prometheus-check: %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_promtool() {
    log "promtool not found: installing Debian's prometheus package"
    # The package's maintainer scripts would start the server; a policy-rc.d
    # that answers 101 forbids that (honoured by invoke-rc.d and, on systemd
    # machines, deb-systemd-invoke). Only ours is removed afterwards.
    local policy=/usr/sbin/policy-rc.d ours=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        ours=1
    fi
    local status=0
    as_root apt-get update -qq || status=$?
    if [ "$status" = 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus >&2 || status=$?
    fi
    [ -z "$ours" ] || as_root rm -f "$policy"
    [ "$status" = 0 ] || { log "ERROR: could not install prometheus (apt exit $status)"; exit "$status"; }
    # Belt and braces on systemd machines: the unit was enabled, not started;
    # keep it from starting at the next boot too.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
}

command -v promtool >/dev/null 2>&1 || install_promtool
promtool --version 2>&1 | head -n1 >&2

step() { printf '\n--- %s\n' "$*"; }

step "promtool check config prometheus.yml"
promtool check config prometheus.yml

step "promtool check config prometheus-kubernetes.yml"
# Debian's promtool is built without Kubernetes service discovery. When it
# rejects kubernetes_sd_configs, check everything else in the file by
# swapping that block for a static target in a temporary copy.
if out=$(promtool check config prometheus-kubernetes.yml 2>&1); then
    printf '%s\n' "$out"
elif grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    cp alerts.yml "$tmp/"
    awk '
        skip { if (match($0, /[^ ]/) > indent || $0 ~ /^ *$/) next; skip = 0 }
        /^ *kubernetes_sd_configs:/ {
            indent = match($0, /[^ ]/); pad = substr($0, 1, indent - 1)
            print pad "static_configs:"; print pad "  - targets: [\"pod.example:9464\"]"
            skip = 1; next
        }
        { print }
    ' prometheus-kubernetes.yml >"$tmp/prometheus-kubernetes.yml"
    grep -q 'kubernetes_sd_configs' "$tmp/prometheus-kubernetes.yml" && { log "ERROR: could not rewrite kubernetes_sd_configs"; exit 1; }
    log "this promtool has no Kubernetes service discovery: checking the file with kubernetes_sd_configs replaced by a static target"
    promtool check config "$tmp/prometheus-kubernetes.yml"
else
    printf '%s\n' "$out" >&2
    exit 1
fi

step "promtool check rules alerts.yml"
promtool check rules alerts.yml

step "promtool test rules alerts.test.yml"
promtool test rules alerts.test.yml

step "every alert tested firing and not firing, and has a runbook"
# alert_rule_test entries look like `alertname: X` followed by either
# `exp_alerts: []` (not firing) or `exp_alerts:` and a list (firing).
coverage=$(awk '
    /^ *alertname:/ { name = $2; next }
    name != "" && /^ *exp_alerts: *\[\]/ { quiet[name] = 1; name = ""; next }
    name != "" && /^ *exp_alerts: *$/ { firing[name] = 1; name = ""; next }
    END { for (n in firing) print n " firing"; for (n in quiet) print n " quiet" }
' alerts.test.yml)
missing=0
while read -r alert; do
    ok=1
    for state in firing quiet; do
        if ! grep -qx "$alert $state" <<<"$coverage"; then
            log "ERROR: alerts.test.yml has no test of $alert $( [ $state = quiet ] && echo 'not firing' || echo firing)"
            ok=
        fi
    done
    if ! grep -qx "### $alert" ../README.md; then
        log "ERROR: deploy/README.md has no runbook section '### $alert'"
        ok=
    fi
    if [ -n "$ok" ]; then
        printf '%s: tested firing and not firing, runbook present\n' "$alert"
    else
        missing=1
    fi
done < <(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' alerts.yml)
[ "$missing" = 0 ] || exit 1

step "runbook_url: absolute, on the base render-alerts.sh replaces, one per alert"
placeholder=$(sed -n "s/^PLACEHOLDER='\(.*\)'$/\1/p" render-alerts.sh)
[ -n "$placeholder" ] || { log "ERROR: no PLACEHOLDER in render-alerts.sh"; exit 1; }
bad=0
while read -r alert; do
    want="runbook_url: \"$placeholder#$(tr 'A-Z' 'a-z' <<<"$alert")\""
    # The alert's block: from its `- alert:` line to the next.
    block=$(awk -v a="$alert" '
        $0 ~ "^ *- alert: *" a "$" { on = 1; next }
        on && /^ *- (alert|record):/ { on = 0 }
        on { print }
    ' alerts.yml)
    if ! grep -qF "$want" <<<"$block"; then
        log "ERROR: $alert has no $want"
        bad=1
    fi
done < <(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' alerts.yml)
[ "$bad" = 0 ] || exit 1
rendered=$(mktemp --suffix=.yml)
bash render-alerts.sh 'https://runbooks.example.org/allocation-worker/README.md' >"$rendered"
if grep -qF "$placeholder#" "$rendered"; then
    log "ERROR: render-alerts.sh left the placeholder base in place"
    exit 1
fi
promtool check rules "$rendered"
rm -f "$rendered"
if bash render-alerts.sh 'not-a-url' >/dev/null 2>&1; then
    log "ERROR: render-alerts.sh accepted a base that is not a URL"
    exit 1
fi
printf 'every alert links its runbook; render-alerts.sh rewrites the base\n'

step "the PrometheusRule of deploy/k8s is what render-alerts.sh --prometheusrule prints"
rule_object=../k8s/components/prometheus-operator/prometheusrule.yaml
if ! diff -u "$rule_object" <(bash render-alerts.sh --prometheusrule "$placeholder"); then
    log "ERROR: $rule_object is not generated from alerts.yml: regenerate it with"
    log "  bash deploy/prometheus/render-alerts.sh --prometheusrule $placeholder > deploy/k8s/components/prometheus-operator/prometheusrule.yaml"
    exit 1
fi
printf '%s: up to date with alerts.yml\n' "$rule_object"

step "Grafana dashboard: structure, metric coverage, every query parses (promtool)"
queries=$(mktemp)
python3 ../grafana/check_dashboard.py --rules "$queries"
promtool check rules "$queries"
rm -f "$queries"

printf '\nprometheus-check: all checks passed\n'

#!/usr/bin/env bash
# Checks the Prometheus configuration, the alerting rules and the Grafana
# dashboard of allocation-worker with promtool, plus what promtool cannot know:
#
#   bash deploy/prometheus/check.sh
#
#   promtool check config   prometheus.yml, prometheus-kubernetes.yml
#   promtool check rules    alerts.yml, and every dashboard query as a rule
#   promtool test rules     alerts.test.yml
#   project                 every alert tested firing and not firing, with a
#                           runbook section in deploy/README.md and its
#                           runbook_url; the PrometheusRule of deploy/k8s is
#                           what render-alerts.sh makes of alerts.yml; the
#                           dashboard (../grafana/check_dashboard.py)
#
# Installs Debian's `prometheus` package for promtool when it is missing
# (install-prometheus.sh), without letting the package start the server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

fail() { printf 'prometheus-check: %s\n' "$*" >&2; exit 1; }
step() { printf '\n--- %s\n' "$*"; }

bash install-prometheus.sh promtool
promtool --version 2>&1 | head -n1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step "promtool check config"
promtool check config prometheus.yml
# Debian's promtool is built without Kubernetes service discovery: where it
# says so, the file is checked with that block swapped for a static target.
if ! out=$(promtool check config prometheus-kubernetes.yml 2>&1); then
    grep -q 'field kubernetes_sd_configs not found' <<<"$out" || { printf '%s\n' "$out" >&2; exit 1; }
    cp alerts.yml "$tmp/"
    awk 'skip { if (match($0, /[^ ]/) > indent || $0 ~ /^ *$/) next; skip = 0 }
        /^ *kubernetes_sd_configs:/ { indent = match($0, /[^ ]/); pad = substr($0, 1, indent - 1)
            print pad "static_configs:"; print pad "  - targets: [\"pod.example:9464\"]"; skip = 1; next }
        { print }' prometheus-kubernetes.yml >"$tmp/prometheus-kubernetes.yml"
    echo "(this promtool has no Kubernetes service discovery: kubernetes_sd_configs swapped for a static target)"
    out=$(promtool check config "$tmp/prometheus-kubernetes.yml" 2>&1) || { printf '%s\n' "$out" >&2; exit 1; }
fi
printf '%s\n' "$out"

step "promtool check rules, promtool test rules"
promtool check rules alerts.yml
promtool test rules alerts.test.yml

step "every alert: tested firing and not firing, a runbook, its runbook_url"
placeholder=$(sed -n "s/^PLACEHOLDER='\(.*\)'$/\1/p" render-alerts.sh)
# alerts.test.yml: `alertname: X` then `exp_alerts: []` (not firing) or
# `exp_alerts:` and a list (firing).
tested=$(awk '/^ *alertname:/ { name = $2; next }
    name != "" && /^ *exp_alerts: *\[\]/ { print name " not firing"; name = "" }
    name != "" && /^ *exp_alerts: *$/ { print name " firing"; name = "" }' alerts.test.yml)
for alert in $(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' alerts.yml); do
    for state in firing "not firing"; do
        grep -qx "$alert $state" <<<"$tested" || fail "alerts.test.yml: no test of $alert $state"
    done
    grep -qx "### $alert" ../README.md || fail "deploy/README.md: no runbook section '### $alert'"
    url="runbook_url: \"$placeholder#$(tr 'A-Z' 'a-z' <<<"$alert")\""
    awk -v a="$alert" '$0 ~ "^ *- alert: *" a "$" { on = 1; next } on && /^ *- (alert|record):/ { on = 0 } on' alerts.yml \
        | grep -qF "$url" || fail "alerts.yml: $alert has no $url"
    echo "$alert: ok"
done

step "the PrometheusRule of deploy/k8s is generated from alerts.yml"
rule_object=../k8s/components/prometheus-operator/prometheusrule.yaml
diff -u "$rule_object" <(bash render-alerts.sh --prometheusrule "$placeholder") \
    || fail "deploy/k8s/components/prometheus-operator/prometheusrule.yaml is not generated from alerts.yml: bash deploy/prometheus/render-alerts.sh --prometheusrule $placeholder > deploy/k8s/components/prometheus-operator/prometheusrule.yaml"
echo "$rule_object: up to date"

step "Grafana dashboard: its queries parse (promtool), its metrics exist"
python3 ../grafana/check_dashboard.py "$tmp/queries.yml"
promtool check rules "$tmp/queries.yml"

printf '\nprometheus-check: all checks passed\n'

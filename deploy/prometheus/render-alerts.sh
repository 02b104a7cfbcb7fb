#!/usr/bin/env bash
# Prints alerts.yml with every `runbook_url` on your runbook base URL (where
# your people read deploy/README.md, whose "### <AlertName>" sections are the
# runbooks) instead of the placeholder; each alert links to
# BASE_URL#<alertname in lower case>. Exit code 2 on a missing or non-http(s)
# base. With --prometheusrule, the same rules as a Prometheus Operator
# PrometheusRule object:
#
#   bash deploy/prometheus/render-alerts.sh [--prometheusrule] BASE_URL > rules.yml
#   RUNBOOK_BASE_URL=BASE_URL bash deploy/prometheus/render-alerts.sh > rules.yml
#
# deploy/k8s/components/prometheus-operator/prometheusrule.yaml is the
# --prometheusrule output for the placeholder base (prometheus/check.sh
# fails when it is not).
set -euo pipefail

PLACEHOLDER='https://github.com/example/allocation-worker/blob/main/deploy/README.md'

format=rules
if [ "${1:-}" = --prometheusrule ]; then
    format=prometheusrule
    shift
fi

base=${1:-${RUNBOOK_BASE_URL:-}}
if [ -z "$base" ]; then
    echo "render-alerts: give the runbook base URL as the argument or RUNBOOK_BASE_URL" >&2
    exit 2
fi
case $base in
    *'#'* | *' '* | *'"'*) echo "render-alerts: RUNBOOK_BASE_URL must not contain '#', spaces or quotes" >&2; exit 2 ;;
    http://* | https://*) ;;
    *) echo "render-alerts: RUNBOOK_BASE_URL must be an absolute http(s) URL, got '$base'" >&2; exit 2 ;;
esac
base=${base%/}
# Escaped for the replacement side of sed's s|||: \, & and the delimiter |.
escaped=$(printf '%s' "$base" | sed -e 's/[\\&|]/\\&/g')
rules="$(dirname "${BASH_SOURCE[0]}")/alerts.yml"
if [ "$format" = rules ]; then
    sed -e "s|${PLACEHOLDER}#|${escaped}#|g" "$rules"
    exit 0
fi
# The PrometheusRule: alerts.yml from its `groups:` line on (its header
# comment is about the file), indented under `spec:`. Block scalars keep
# their meaning when every line moves right by the same amount.
cat <<'EOF'
# GENERATED from deploy/prometheus/alerts.yml by
# deploy/prometheus/render-alerts.sh --prometheusrule: do not edit. Change
# alerts.yml (and its tests, alerts.test.yml), then regenerate with the
# command at the top of render-alerts.sh; deploy/prometheus/check.sh fails
# when this file is not what the script prints.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: allocation-worker
  labels:
    app.kubernetes.io/name: allocation-worker
spec:
EOF
sed -n '/^groups:/,$p' "$rules" | sed -e "s|${PLACEHOLDER}#|${escaped}#|g" -e 's/^\(.\)/  \1/'

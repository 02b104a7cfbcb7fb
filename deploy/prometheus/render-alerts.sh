#!/usr/bin/env bash
# Prints alerts.yml with every `runbook_url` built on your runbook base URL
# instead of the placeholder it ships with:
#
#   bash deploy/prometheus/render-alerts.sh BASE_URL > allocation-worker-alerts.yml
#   RUNBOOK_BASE_URL=BASE_URL bash deploy/prometheus/render-alerts.sh > ...
#
# BASE_URL is where your people read deploy/README.md (the runbooks are its
# "### <AlertName>" sections), e.g.
# https://git.example.com/ops/allocation-worker/-/blob/v0.1.0/deploy/README.md;
# each alert links to BASE_URL#<alertname in lower case>. Load the output as
# a rule file instead of alerts.yml. Exit code 2 on a missing or non-http(s)
# base.
#
# With --prometheusrule, the same rules as a Prometheus Operator
# PrometheusRule object instead:
#
#   bash deploy/prometheus/render-alerts.sh --prometheusrule BASE_URL > prometheusrule.yaml
#
# deploy/k8s/components/prometheus-operator/prometheusrule.yaml is this
# output for the placeholder base, regenerated with
#
#   bash deploy/prometheus/render-alerts.sh --prometheusrule \
#       https://github.com/example/allocation-worker/blob/main/deploy/README.md \
#       > deploy/k8s/components/prometheus-operator/prometheusrule.yaml
#
# and prometheus/check.sh fails when the committed file differs from it.
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
    http://* | https://*) ;;
    *)
        echo "render-alerts: RUNBOOK_BASE_URL must be an absolute http(s) URL, got '$base'" >&2
        exit 2
        ;;
esac
case $base in
    *'#'* | *' '* | *'"'*)
        echo "render-alerts: RUNBOOK_BASE_URL must not contain '#', spaces or quotes" >&2
        exit 2
        ;;
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

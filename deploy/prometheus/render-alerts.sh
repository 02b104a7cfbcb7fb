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
set -euo pipefail

PLACEHOLDER='https://github.com/example/allocation-worker/blob/main/deploy/README.md'

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
sed -e "s|${PLACEHOLDER}#|${escaped}#|g" "$(dirname "${BASH_SOURCE[0]}")/alerts.yml"

#!/usr/bin/env python3
"""Checks deploy/grafana/dashboards/*.json (standard library only).

- the JSON parses, panel ids are unique, panels fit the 24-column grid, every
  query uses the dashboard's ${datasource} variable;
- every metric of the worker's contract is shown by at least one panel, and
  every query filters by the $namespace variable as well as $job;
- with --rules FILE: writes every panel query, with Grafana's variables
  replaced, as a Prometheus rule file, so that `promtool check rules FILE`
  proves each one is valid PromQL (deploy/prometheus/check.sh does this).

Exit status 1 with one line per problem.
"""
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
METRICS = [
    "allocation_messages_consumed_total",
    "allocation_message_handling_duration_seconds_bucket",
    "allocation_events_published_total",
    "allocation_dead_letters_total",
    "allocation_outbox_backlog_events",
    "allocation_outbox_oldest_unsent_age_seconds",
    "allocation_consumer_lag_messages",
    "allocation_optimistic_concurrency_retries_total",
    "allocation_ready",
    "allocation_waiting_messages",
    "allocation_waiting_oldest_age_seconds",
    "allocation_retention_removed_rows_total",
    "allocation_retention_kept_rows",
    "allocation_build_info",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "allocation_kafka_consumer_errors_total",
    # The database pool (README.md, "Metrics").
    "allocation_db_pool_connections",
    "allocation_db_pool_max_connections",
    "allocation_db_pool_waiting",
    # The relay's quarantine and the aggregate's statement timeouts.
    "allocation_outbox_quarantined_events",
    "allocation_db_statement_timeouts_total",
]
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$namespace": ".*",
    "$job": ".*",
    "$instance": ".*",
}


def panels_of(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def check(path, problems, queries):
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path.name}: {error}")
        return
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"{path.name}: no {key}")
    seen = set()
    for panel in panels_of(dashboard):
        pid, title = panel.get("id"), panel.get("title", "?")
        if pid in seen:
            problems.append(f"{path.name}: panel id {pid} used twice")
        seen.add(pid)
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{path.name}: panel {title!r} is wider than the grid")
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{path.name}: panel {title!r} does not use the ${{datasource}} variable")
            expr = target.get("expr", "")
            # Kubernetes runs one worker per namespace and environment: every
            # series selector that picks the job picks the namespace too.
            if 'job=~"$job"' in expr and expr.count('job=~"$job"') != expr.count('namespace=~"$namespace"'):
                problems.append(f"{path.name}: panel {title!r} does not filter by $namespace: {expr}")
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            if "$" in expr:
                problems.append(f"{path.name}: panel {title!r} has an unknown variable: {expr}")
            queries.append((f"{path.stem} / {title} / {target.get('refId')}", expr))


def main(argv):
    problems, queries = [], []
    files = sorted((HERE / "dashboards").glob("*.json"))
    if not files:
        problems.append("no dashboards found")
    for path in files:
        check(path, problems, queries)
    shown = " ".join(expr for _, expr in queries)
    for metric in METRICS:
        if not re.search(rf"\b{metric}\b", shown):
            problems.append(f"no panel shows {metric}")
    if len(argv) == 3 and argv[1] == "--rules":
        lines = ["groups:", "  - name: dashboard-queries", "    rules:"]
        for number, (where, expr) in enumerate(queries):
            lines += [f"      - record: dashboard_query_{number}",
                      f"        expr: {json.dumps(expr)}",
                      f"        labels: {{panel: {json.dumps(where)}}}"]
        pathlib.Path(argv[2]).write_text("\n".join(lines) + "\n")
    for problem in problems:
        print(f"dashboard-check: {problem}", file=sys.stderr)
    print(f"dashboard-check: {len(files)} dashboard(s), {len(queries)} queries, "
          f"{len(METRICS)} contract metrics shown" if not problems else "dashboard-check: FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

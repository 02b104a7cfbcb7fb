#!/usr/bin/env python3
"""What promtool cannot see in the dashboards and alert rules (standard library only).

    python3 deploy/grafana/check_dashboard.py RULES_OUT

- every dashboard parses; each query uses the ${datasource} variable, and
  filters by $namespace wherever it filters by $job (one worker per
  namespace on Kubernetes);
- every allocation_* metric that a query or alerts.yml names is one the
  worker exports (its name is in src/; PromQL accepts any name, so a typo
  would only show as an empty panel or an alert that never fires);
- writes the queries, Grafana's variables replaced, as a rule file to
  RULES_OUT, so that `promtool check rules` parses each one as PromQL.

deploy/prometheus/check.sh runs it. One line per problem, exit status 1.
"""
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
             "$namespace": ".*", "$job": ".*", "$instance": ".*"}
exported = {m for f in (ROOT / "src").rglob("*.rs") for m in re.findall(r'"(allocation_[a-z_]+)"', f.read_text())}
problems, queries = [], []
for path in sorted((HERE / "dashboards").glob("*.json")):
    try:
        dashboard = json.loads(path.read_text())
    except ValueError as error:
        problems.append(f"{path.name}: {error}")
        continue
    panels = [p for top in dashboard.get("panels", []) for p in [top, *top.get("panels", [])]]
    for panel in panels:
        for target in panel.get("targets", []):
            where, expr = f"{path.name}: panel {panel.get('title')!r}", target.get("expr", "")
            if (target.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"{where}: does not use the ${{datasource}} variable")
            if expr.count('job=~"$job"') != expr.count('namespace=~"$namespace"'):
                problems.append(f"{where}: filters by $job without $namespace: {expr}")
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            if "$" in expr:
                problems.append(f"{where}: unknown variable in {expr}")
            queries.append((f"{path.stem} / {panel.get('title')} / {target.get('refId')}", expr))
named = " ".join(e for _, e in queries) + (ROOT / "deploy/prometheus/alerts.yml").read_text()
for metric in sorted(set(re.findall(r"\ballocation_[a-z_]+", named))):
    if re.sub(r"_(bucket|sum|count)$", "", metric) not in exported:
        problems.append(f"{metric}: named by a dashboard or alerts.yml, but the worker exports no such metric")
rules = ["groups:", "  - name: dashboard-queries", "    rules:"]
for number, (where, expr) in enumerate(queries):
    rules += [f"      - record: dashboard_query_{number}", f"        expr: {json.dumps(expr)}",
              f"        labels: {{panel: {json.dumps(where)}}}"]
pathlib.Path(sys.argv[1]).write_text("\n".join(rules) + "\n")
for problem in problems:
    print(f"dashboard-check: {problem}", file=sys.stderr)
print(f"dashboard-check: FAILED ({len(problems)} problems)" if problems else f"dashboard-check: {len(queries)} queries ok")
sys.exit(1 if problems else 0)

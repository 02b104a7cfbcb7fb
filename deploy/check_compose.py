#!/usr/bin/env python3
"""What Compose's own validation cannot know about the worker's stack.

    COMPOSE -f docker-compose.yml [-f docker-compose.local.yml] config --format json \
        | python3 deploy/check_compose.py NAME

reads the model `config` printed (merged, paths absolute) and checks that
every bind-mounted file exists (Compose would create an empty directory in
its place), that every variable set on the worker and on migrate is a setting
the worker reads, and that the stop grace period outlasts SHUTDOWN_TIMEOUT.
deploy/check.sh runs it; one line per problem, exit status 1.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from settings import known_setting, seconds  # noqa: E402

name = sys.argv[1]
services = json.load(sys.stdin)["services"]
problems = []
for service, spec in services.items():
    for volume in spec.get("volumes") or []:
        if volume.get("type") == "bind" and not pathlib.Path(volume["source"]).exists():
            problems.append(f"{service}: bind-mounted {volume['source']} does not exist")
for service in ("worker", "migrate"):
    for key in (services.get(service) or {}).get("environment") or {}:
        if not known_setting(key):
            problems.append(f"{service}: {key} is not a setting the worker reads (src/: env = \"...\")")
worker = services.get("worker") or {}
grace = seconds(worker.get("stop_grace_period", "10s"))
shutdown = seconds((worker.get("environment") or {}).get("SHUTDOWN_TIMEOUT") or "20s")
if grace <= shutdown:
    problems.append(f"worker: stop_grace_period {grace:g}s does not outlast SHUTDOWN_TIMEOUT {shutdown:g}s")
for problem in problems:
    print(f"compose-check: {name}: {problem}", file=sys.stderr)
print(f"compose-check: {name}: {len(services)} services, " + (f"{len(problems)} problems" if problems else "ok"))
sys.exit(1 if problems else 0)

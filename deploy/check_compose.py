#!/usr/bin/env python3
"""Checks deploy/docker-compose.yml and docker-compose.local.yml without a Docker engine.

    python3 deploy/check_compose.py [--compose BINARY]

1. The file parses (PyYAML); every bind-mounted file or folder and every build
   context's Dockerfile exists.
2. What the worker needs of it: HTTP_ADDR 0.0.0.0:9464, a /readyz
   healthcheck, a stop grace period longer than SHUTDOWN_TIMEOUT, migrations by
   the one-shot `migrate` service (SKIP_MIGRATIONS on the worker), the seven
   topics of the README created with 6 partitions, Prometheus given the
   rule files that prometheus.yml names, Grafana given the dashboards folder
   its provisioning names.
3. Every image is a variable whose default is an official image
   (`${KAFKA_IMAGE:-apache/kafka:3.9.0}`), every host port a variable too.
4. docker-compose.local.yml (the local stand-ins, on top of the first): it
   changes only services of the first file, its images are variables with
   local defaults, a broker healthcheck, and the stack the two make
   together passes 1 and 2 (merged here as Compose does for the keys it uses:
   mappings key by key, anything else replaced, `!reset` removes).
5. With --compose BINARY (Docker Compose v2: `docker compose` or a
   docker-compose binary): `BINARY -f deploy/docker-compose.yml config -q`,
   the same with docker-compose.local.yml on top: Compose's own validation
   (it needs no engine).

Exit status 1 with one line per problem.
"""
import argparse
import pathlib
import re
import subprocess
import sys

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("compose-check: PyYAML is missing (pip install pyyaml)")

HERE = pathlib.Path(__file__).resolve().parent
COMPOSE = HERE / "docker-compose.yml"
LOCAL = HERE / "docker-compose.local.yml"
# `${NAME:-default}`: what a user may set, and what they get when they do not.
VARIABLE = re.compile(r"^\$\{([A-Z][A-Z0-9_]*):-([^}]+)\}$")
TOPICS = [
    "erp.batch-created",
    "erp.batch-quantity-changed",
    "erp.allocation-required",
    "allocation.allocated",
    "allocation.deallocated",
    "allocation.out-of-stock",
    "allocation.dead-letter",
]
problems = []


def problem(message):
    problems.append(message)


class Reset:
    """Compose's `!reset` tag: the key is removed from what it overrides."""


class Loader(yaml.SafeLoader):
    """PyYAML plus the two override tags of Compose v2.24+."""


Loader.add_constructor("!reset", lambda loader, node: Reset())
# `!override` replaces instead of merging; merge() replaces lists anyway.
Loader.add_constructor(
    "!override",
    lambda loader, node: loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node, deep=True),
)


def merge(base, override):
    """An override file applied to a compose file, as Compose does for what
    docker-compose.local.yml uses: mappings merged key by key, anything else
    (command, healthcheck test) replaced, `!reset` removing the key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", str(duration))
    if not parts:
        raise ValueError(f"cannot read duration {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def bind_mounts(service):
    for volume in service.get("volumes") or []:
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/")):
            target = volume.split(":")[1] if isinstance(volume, str) else volume.get("target")
            yield (HERE / source).resolve(), target


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (str(v) if v is not None else None) for k, v in env.items()}


def check(compose):
    services = compose.get("services") or {}
    for name in ("kafka", "kafka-init", "postgres", "migrate", "worker", "prometheus", "grafana"):
        if name not in services:
            problem(f"no service {name}")
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            if not source.exists():
                problem(f"{name}: mounted {source} does not exist")
        build = service.get("build")
        if build:
            context = HERE / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
            if not dockerfile.is_file():
                problem(f"{name}: build {dockerfile} does not exist")
            if not (context / ".dockerignore").is_file():
                problem(f"{name}: build context {context.resolve()} has no .dockerignore (target/ would be sent)")

    worker = services.get("worker") or {}
    env = environment(worker)
    if env.get("HTTP_ADDR") != "0.0.0.0:9464":
        problem("worker: HTTP_ADDR must be 0.0.0.0:9464 in a container")
    for key in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        if not env.get(key):
            problem(f"worker: no {key}")
    if env.get("SKIP_MIGRATIONS") != "true":
        problem("worker: SKIP_MIGRATIONS should be \"true\" (the migrate service applies them)")
    if worker.get("command") != ["run"]:
        problem("worker: command should be [run]")
    test = " ".join((worker.get("healthcheck") or {}).get("test") or [])
    if "/readyz" not in test:
        problem("worker: the healthcheck does not ask /readyz")
    try:
        grace = seconds(worker.get("stop_grace_period", "10s"))
        shutdown = seconds(env.get("SHUTDOWN_TIMEOUT") or "20s")
        if not grace > shutdown:
            problem(f"worker: stop_grace_period ({grace}s) must exceed SHUTDOWN_TIMEOUT ({shutdown}s)")
    except ValueError as error:
        problem(f"worker: {error}")
    depends = worker.get("depends_on") or {}
    for dependency in ("migrate", "kafka-init"):
        if (depends.get(dependency) or {}).get("condition") != "service_completed_successfully":
            problem(f"worker: must wait for {dependency} to complete successfully")

    migrate = services.get("migrate") or {}
    if migrate.get("command") != ["migrate"]:
        problem("migrate: command should be [migrate]")
    if migrate.get("image") != worker.get("image"):
        problem("migrate: not the worker's image")

    init = " ".join(str(c) for c in (services.get("kafka-init") or {}).get("command") or [])
    for topic in TOPICS:
        if not re.search(rf"(?<![\w.-]){re.escape(topic)}(?![\w.-])", init):
            problem(f"kafka-init: topic {topic} is not created")
    if "--partitions 6" not in init:
        problem("kafka-init: topics are not created with 6 partitions")

    # Prometheus gets every rule file its configuration names, beside it.
    prometheus = services.get("prometheus") or {}
    mounts = {target: source for source, target in bind_mounts(prometheus)}
    config_source = mounts.get("/etc/prometheus/prometheus.yml")
    if not config_source:
        problem("prometheus: prometheus.yml is not mounted at /etc/prometheus/prometheus.yml")
    elif config_source.exists():
        config = yaml.safe_load(config_source.read_text())
        for rule_file in config.get("rule_files") or []:
            if f"/etc/prometheus/{rule_file}" not in mounts:
                problem(f"prometheus: rule file {rule_file} is not mounted beside prometheus.yml")
        jobs = [j.get("job_name") for j in config.get("scrape_configs") or []]
        if "allocation-worker" not in jobs:
            problem("prometheus.yml: no scrape job allocation-worker (the alerts' `up` rules need it)")

    # Grafana's dashboard provider reads the folder that is mounted.
    grafana = services.get("grafana") or {}
    mounts = {target: source for source, target in bind_mounts(grafana)}
    provisioning = mounts.get("/etc/grafana/provisioning")
    if not provisioning:
        problem("grafana: no provisioning mounted at /etc/grafana/provisioning")
    else:
        for provider_file in sorted((provisioning / "dashboards").glob("*.yml")):
            for provider in yaml.safe_load(provider_file.read_text()).get("providers") or []:
                path = (provider.get("options") or {}).get("path")
                if path not in mounts:
                    problem(f"grafana: provider {provider.get('name')} reads {path}, which is not mounted")
                elif not list(mounts[path].glob("*.json")):
                    problem(f"grafana: no dashboard JSON in {mounts[path]}")
        datasources = list((provisioning / "datasources").glob("*.yml"))
        if not datasources:
            problem("grafana: no datasource provisioned")
        for datasource_file in datasources:
            for datasource in yaml.safe_load(datasource_file.read_text()).get("datasources") or []:
                if "prometheus:9090" not in datasource.get("url", ""):
                    problem(f"grafana: datasource {datasource.get('name')} does not point at the prometheus service")


def check_variables(compose):
    """Images and host ports of the first file: variables, official defaults."""
    for name, service in (compose.get("services") or {}).items():
        match = VARIABLE.match(str(service.get("image", "")))
        if not match:
            problem(f"{name}: image {service.get('image')!r} is not ${{VARIABLE:-official image}}")
        elif match.group(2).endswith(":local"):
            problem(f"{name}: image defaults to the local stand-in {match.group(2)}; the official image belongs here")
        for port in service.get("ports") or []:
            host = str(port).rsplit(":", 1)[0]
            if not VARIABLE.match(host):
                problem(f"{name}: host port of {port!r} is not ${{VARIABLE:-port}}")


def check_local(compose, local):
    """docker-compose.local.yml, alone and on top of the first file."""
    services = compose.get("services") or {}
    for name, service in (local.get("services") or {}).items():
        if name not in services:
            problem(f"docker-compose.local.yml: service {name} is not in docker-compose.yml")
        image = service.get("image")
        if image is not None:
            match = VARIABLE.match(str(image))
            if not match or not match.group(2).endswith(":local"):
                problem(f"docker-compose.local.yml: {name}: image {image!r} is not ${{VARIABLE:-local stand-in:local}}")
    kafka = (local.get("services") or {}).get("kafka") or {}
    test = " ".join(str(t) for t in (kafka.get("healthcheck") or {}).get("test") or [])
    if not test or "/opt/kafka" in test:
        problem("docker-compose.local.yml: kafka needs a healthcheck of its own (the stand-in has no /opt/kafka)")
    check(merge(compose, local))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compose", nargs="+", metavar="BINARY",
                        help="Docker Compose v2 command, e.g. `docker compose` or a docker-compose binary")
    options = parser.parse_args()
    try:
        compose = yaml.safe_load(COMPOSE.read_text())
        local = yaml.load(LOCAL.read_text(), Loader=Loader)
    except (OSError, yaml.YAMLError) as error:
        print(f"compose-check: {error}", file=sys.stderr)
        return 1
    check(compose)
    check_variables(compose)
    print(f"compose-check: {len(compose.get('services') or {})} services, structure checked")
    before = len(problems)
    check_local(compose, local)
    # The merged stack's problems name the file they come from.
    problems[before:] = [p if p.startswith("docker-compose.local.yml") else f"with docker-compose.local.yml: {p}"
                         for p in problems[before:]]
    print(f"compose-check: docker-compose.local.yml: {len(local.get('services') or {})} services, structure checked")
    if options.compose:
        for files in ([COMPOSE], [COMPOSE, LOCAL]):
            arguments = [argument for path in files for argument in ("-f", str(path))]
            result = subprocess.run([*options.compose, *arguments, "config", "-q"],
                                    capture_output=True, text=True)
            shown = " + ".join(path.name for path in files)
            if result.returncode != 0:
                problem(f"{' '.join(options.compose)} config ({shown}): {(result.stderr or result.stdout).strip()}")
            else:
                version = subprocess.run([*options.compose, "version", "--short"], capture_output=True, text=True)
                print(f"compose-check: docker compose {version.stdout.strip()} config ({shown}): valid")
    for line in problems:
        print(f"compose-check: {line}", file=sys.stderr)
    if problems:
        print(f"compose-check: FAILED ({len(problems)} problems)")
        return 1
    print("compose-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

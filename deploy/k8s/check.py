#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/k8s.

    python3 deploy/k8s/check.py --kubectl PATH [--crd-models NODE_MODULES]
                                [--kubernetes-version 1.30.0]

deploy/check.sh installs the tools and passes them. For the base and each
overlay (overlays/dev, overlays/prod):

1. `kubectl kustomize` renders it (kustomize as built into kubectl).
2. The rendered objects are validated strictly (unknown fields rejected)
   against the Kubernetes API schemas (kubernetes-validate, which ships
   them); custom resources (KEDA, Prometheus Operator) against their CRDs'
   schemas with validate-crds.mjs (the @kubernetes-models npm packages).
3. What the worker needs of them (README "Configuration", contract §7,
   deploy/README.md "Kubernetes"): probes (liveness /healthz on
   http-metrics, readiness /readyz on read-model), resources, a grace
   period longer than SHUTDOWN_TIMEOUT, non-root with a read-only root
   filesystem, settings from a generated ConfigMap, credentials from the
   Secrets mounted as files (the runtime role's for the worker, the
   migration role's for the migrate init container), selectors of the
   Services, PodDisruptionBudget, ServiceMonitor, ScaledObject and
   NetworkPolicy that match what they point at, at least two replicas (or
   a ScaledObject with a minimum of two), no migrate Job beside the init
   container, and no Secret in the base.

The example Secrets (base/secret.example.yaml) are checked for their keys
and placeholders. Exit status 1 with one line per problem.
"""
import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys

try:
    import yaml
except ImportError:  # pragma: no cover - reported, not hidden
    sys.exit("k8s-check: PyYAML is missing (pip install pyyaml)")

HERE = pathlib.Path(__file__).resolve().parent
TREES = ["base", "overlays/dev", "overlays/prod"]
METRICS_PORT, READ_MODEL_PORT = 9464, 8080
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def seconds(duration):
    """A humantime duration such as 20s, 1m or 1m30s, in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]+)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration.replace(" ", ""):
        raise ValueError(f"cannot read duration {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def millicores(cpu):
    cpu = str(cpu)
    return int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def render(kubectl, tree):
    result = subprocess.run([kubectl, "kustomize", str(HERE / tree)], capture_output=True, text=True)
    if result.returncode != 0:
        problem(f"kubectl kustomize {tree}", result.stderr.strip() or f"exit {result.returncode}")
        return []
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def check_container(where, container, pod_security):
    security = container.get("securityContext") or {}
    if security.get("readOnlyRootFilesystem") is not True:
        problem(where, "readOnlyRootFilesystem is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        problem(where, "allowPrivilegeEscalation is not false")
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        problem(where, "capabilities are not all dropped")
    resources = container.get("resources") or {}
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(bound) or {}):
                problem(where, f"no resources.{bound}.{resource}")
    if any("secretRef" in e for e in container.get("envFrom") or []):
        problem(where, "envFrom a Secret: credentials are mounted as files, not environment variables")
    for e in container.get("env") or []:
        if e.get("name") in ("DATABASE_URL", "KAFKA_PROPERTIES"):
            problem(where, f"{e['name']} is set; the Secret's file is read through {e['name']}_FILE")
    if not pod_security.get("fsGroup"):
        problem(where, "no pod securityContext.fsGroup: the non-root user cannot read the Secrets' files")


def secret_files(where, container, volumes, secret, keys):
    """The container mounts Secret `secret` (or a generated secret-<hash>)
    read-only and names its keys in the *_FILE settings."""
    env = {e.get("name"): e.get("value", "") for e in container.get("env") or []}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        name = ((volumes.get(mount.get("name")) or {}).get("secret") or {}).get("secretName", "")
        if re.fullmatch(re.escape(secret) + r"(-[a-z0-9]{10})?", name):
            mounts.append(mount)
            if mount.get("readOnly") is not True:
                problem(where, f"the Secret's mount {mount.get('mountPath')} is not readOnly")
    if not mounts:
        problem(where, f"the Secret {secret} is not mounted")
    for setting, key in keys:
        if not any(env.get(setting) == f"{m.get('mountPath')}/{key}" for m in mounts):
            problem(where, f"{setting} is {env.get(setting)!r}, expected {secret}'s {key} in its mount")


def check_tree(tree, objects):
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o.get("kind"), []).append(o)
    at = f"[{tree}]"
    deployments = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == "allocation-worker"]
    if len(deployments) != 1:
        problem(at, "no Deployment allocation-worker")
        return
    deployment = deployments[0]
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    pod_labels = (template.get("metadata") or {}).get("labels") or {}
    pod = template.get("spec") or {}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    pod_security = pod.get("securityContext") or {}
    if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
        problem(at, "pod securityContext: runAsNonRoot true and a non-zero runAsUser expected")
    if not matches((spec.get("selector") or {}).get("matchLabels"), pod_labels):
        problem(at, "Deployment selector.matchLabels do not match the pod template's labels")

    # Settings: one generated ConfigMap (name-<hash>), the same for both containers.
    containers = pod.get("containers") or []
    inits = pod.get("initContainers") or []
    if len(containers) != 1 or len(inits) != 1:
        problem(at, "expected one container (worker) and one init container (migrate)")
        return
    worker, migrate = containers[0], inits[0]
    refs = {c.get("name"): [e["configMapRef"]["name"] for e in c.get("envFrom") or [] if "configMapRef" in e]
            for c in (worker, migrate)}
    configmap_name = (refs[worker.get("name")] or [None])[0]
    if any(r != [configmap_name] for r in refs.values()):
        problem(at, f"both containers must read the same one ConfigMap: {refs}")
    if not re.fullmatch(r"allocation-worker-[a-z0-9]{10}", configmap_name or ""):
        problem(at, f"ConfigMap {configmap_name!r} is not generated (allocation-worker-<hash>): a change would not roll the pods")
    configmap = next((c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == configmap_name), {})
    settings = configmap.get("data") or {}
    for key in ("DATABASE_URL", "KAFKA_PROPERTIES"):
        if key in settings:
            problem(at, f"ConfigMap holds {key}: credentials belong in the Secret")
    expected = {"HTTP_ADDR": f"0.0.0.0:{METRICS_PORT}", "READ_MODEL_ADDR": f"0.0.0.0:{READ_MODEL_PORT}",
                "SKIP_MIGRATIONS": "true"}
    for key, value in expected.items():
        if settings.get(key) != value:
            problem(at, f"ConfigMap {key} is {settings.get(key)!r}, expected {value!r}")
    if "KAFKA_BOOTSTRAP_SERVERS" not in settings:
        problem(at, "ConfigMap has no KAFKA_BOOTSTRAP_SERVERS")
    try:
        shutdown = seconds(settings.get("SHUTDOWN_TIMEOUT", "20s"))
    except ValueError as error:
        problem(at, str(error))
        shutdown = 20
    if not pod.get("terminationGracePeriodSeconds", 30) > shutdown:
        problem(at, f"terminationGracePeriodSeconds is not above SHUTDOWN_TIMEOUT ({shutdown}s)")

    # The worker: runtime role's Secret, ports, probes, resources.
    check_container(f"{at} worker", worker, pod_security)
    if worker.get("args") != ["run"]:
        problem(at, f"worker args are {worker.get('args')}, expected ['run']")
    secret_files(f"{at} worker", worker, volumes, "allocation-worker-secrets",
                 [("DATABASE_URL_FILE", "DATABASE_URL"), ("KAFKA_PROPERTIES_FILE", "kafka.properties")])
    ports = {p.get("name"): p.get("containerPort") for p in worker.get("ports") or []}
    if ports != {"http-metrics": METRICS_PORT, "read-model": READ_MODEL_PORT}:
        problem(at, f"worker ports are {ports}, expected http-metrics {METRICS_PORT} and read-model {READ_MODEL_PORT}")
    for probe, path, port in (("livenessProbe", "/healthz", "http-metrics"), ("readinessProbe", "/readyz", "read-model")):
        http = (worker.get(probe) or {}).get("httpGet") or {}
        if (http.get("path"), http.get("port")) != (path, port):
            problem(at, f"{probe} is GET {http.get('path')} on {http.get('port')}, expected {path} on {port}")
    cpu = ((worker.get("resources") or {}).get("requests") or {}).get("cpu", "0")
    if millicores(cpu) < 250:
        problem(at, f"worker CPU request {cpu} is below the measured 250m at 1,000 msg/s (BENCHMARKS.md)")
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if annotations.get("prometheus.io/port") != str(METRICS_PORT):
        problem(at, f"pod annotation prometheus.io/port is not {METRICS_PORT}")

    # The migrate init container: the worker's image, the migrator's Secret.
    check_container(f"{at} migrate", migrate, pod_security)
    if migrate.get("args") != ["migrate"] or migrate.get("image") != worker.get("image"):
        problem(at, "the init container must run `migrate` with the worker's image (its migrations)")
    secret_files(f"{at} migrate", migrate, volumes, "allocation-worker-migrator", [("DATABASE_URL_FILE", "DATABASE_URL")])
    if any(((volumes.get(m.get("name")) or {}).get("secret") or {}).get("secretName", "").startswith("allocation-worker-secrets")
           for m in migrate.get("volumeMounts") or []):
        problem(at, "the migrate init container mounts the runtime role's Secret")

    # Rollout: old pods run until a new one is ready, and a while after.
    strategy = spec.get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate" or (strategy.get("rollingUpdate") or {}).get("maxUnavailable") != 0:
        problem(at, "strategy must be RollingUpdate with maxUnavailable 0")
    if not spec.get("minReadySeconds", 0) > 0:
        problem(at, "no minReadySeconds: each new pod should settle in the consumer group before the next old one stops")

    # Replicas: at least two, fixed or as KEDA's minimum.
    scaled = [s for s in by_kind.get("ScaledObject", []) if (s["spec"].get("scaleTargetRef") or {}).get("name") == "allocation-worker"]
    if scaled:
        s = scaled[0]["spec"]
        if "replicas" in spec:
            problem(at, "the Deployment sets replicas although a ScaledObject owns them (every apply would reset them)")
        low, high = s.get("minReplicaCount"), s.get("maxReplicaCount")
        if not (isinstance(low, int) and isinstance(high, int) and 2 <= low <= high):
            problem(at, "ScaledObject: minReplicaCount at least 2 and maxReplicaCount not below it")
    elif tree == "base" and spec.get("replicas", 1) < 2:
        problem(at, "replicas below 2 in the base")

    # Services: one per listener.
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for name, port_name, port in (("allocation-worker-metrics", "http-metrics", METRICS_PORT),
                                  ("allocation-worker-read-model", "read-model", READ_MODEL_PORT)):
        service = (services.get(name) or {}).get("spec") or {}
        if not matches(service.get("selector"), pod_labels):
            problem(at, f"Service {name}: missing, or its selector does not match the pods")
        service_ports = [(p.get("name"), p.get("port"), p.get("targetPort")) for p in service.get("ports") or []]
        if service_ports != [(port_name, port, port_name)]:
            problem(at, f"Service {name} ports are {service_ports}, expected only {port_name} {port}")

    pdbs = by_kind.get("PodDisruptionBudget", [])
    pdb = (pdbs[0] if pdbs else {}).get("spec") or {}
    if pdb.get("maxUnavailable") != 1 or "minAvailable" in pdb or not matches((pdb.get("selector") or {}).get("matchLabels"), pod_labels):
        problem(at, "expected a PodDisruptionBudget on the pods with maxUnavailable: 1 and no minAvailable")

    for monitor in by_kind.get("ServiceMonitor", []):
        m = monitor["spec"]
        target = [s for s in services.values() if matches((m.get("selector") or {}).get("matchLabels"), s["metadata"].get("labels") or {})]
        if [s["metadata"]["name"] for s in target] != ["allocation-worker-metrics"]:
            problem(at, f"ServiceMonitor selects {[s['metadata']['name'] for s in target]}, expected the metrics Service only")
        elif (target[0]["metadata"].get("labels") or {}).get(m.get("jobLabel")) != "allocation-worker":
            problem(at, "ServiceMonitor jobLabel does not give job=allocation-worker (the `up` alerts select it)")
        if [e.get("port") for e in m.get("endpoints") or []] != ["http-metrics"]:
            problem(at, "ServiceMonitor must scrape port http-metrics")

    for policy in by_kind.get("NetworkPolicy", []):
        p = policy["spec"]
        if not matches((p.get("podSelector") or {}).get("matchLabels"), pod_labels):
            problem(at, "NetworkPolicy podSelector does not match the pods")
        ingress = {port.get("port") for rule in p.get("ingress") or [] for port in rule.get("ports") or []}
        egress = {port.get("port") for rule in p.get("egress") or [] for port in rule.get("ports") or []}
        if ingress != {"http-metrics", "read-model"}:
            problem(at, f"NetworkPolicy ingress ports are {ingress}, expected http-metrics and read-model")
        if not {53, 5432, 9092} <= egress:
            problem(at, f"NetworkPolicy egress ports {egress} lack DNS, PostgreSQL or Kafka")

    for o in objects:
        if o.get("kind") == "Job":
            problem(at, f"Job {o['metadata']['name']}: the init container migrates; a Job beside it is a second procedure")
        if tree == "base" and (o.get("kind") == "Secret" or "namespace" in o.get("metadata", {})):
            problem(at, f"{o['kind']} {o['metadata']['name']}: the base has no Secret and no namespace")


def check_secret_example():
    path = HERE / "base" / "secret.example.yaml"
    secrets = {d["metadata"]["name"]: d.get("stringData") or {} for d in yaml.safe_load_all(path.read_text()) if d}
    wanted = {"allocation-worker-secrets": {"DATABASE_URL", "kafka.properties"}, "allocation-worker-migrator": {"DATABASE_URL"}}
    for name, keys in wanted.items():
        if set(secrets.get(name, {})) != keys:
            problem(path.name, f"Secret {name} keys are {sorted(secrets.get(name, {}))}, expected {sorted(keys)}")
        if not all("CHANGE_ME" in str(v) for v in secrets.get(name, {}).values()):
            problem(path.name, f"every value of {name} must carry the CHANGE_ME placeholder")
    return [("secret.example.yaml", d) for d in yaml.safe_load_all(path.read_text()) if d]


def schema_validate(documents, version, crd_models):
    import kubernetes_validate

    custom = [(w, d) for w, d in documents if d.get("apiVersion", "").startswith(CRD_GROUPS)]
    for where, document in documents:
        if (where, document) in custom:
            continue
        what = f"{where}: {document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problem(what, f"schema (Kubernetes {version}, strict): {path}: {error.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as error:
            problem(what, f"schema: {error}")
    print(f"k8s-check: kubernetes-validate {kubernetes_validate.__version__}, strict, Kubernetes {version}: "
          f"{len(documents) - len(custom)} objects validated")
    if not custom:
        return
    if not crd_models:
        problem("schema", f"{len(custom)} custom resources and no --crd-models to validate them")
        return
    result = subprocess.run(["node", str(HERE / "validate-crds.mjs"), crd_models],
                            input=json.dumps(custom), capture_output=True, text=True)
    for line in result.stdout.splitlines():
        problem("CRD schema", line)
    if result.returncode != 0 and not result.stdout.strip():
        problem("CRD schema", result.stderr.strip() or f"validate-crds.mjs exit {result.returncode}")
    print(f"k8s-check: {result.stderr.strip()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubectl", default=shutil.which("kubectl"))
    parser.add_argument("--crd-models", help="node_modules with @kubernetes-models/keda and prometheus-operator")
    parser.add_argument("--kubernetes-version", default="1.30.0")
    options = parser.parse_args()
    if not options.kubectl:
        sys.exit("k8s-check: no kubectl (deploy/check.sh installs one)")
    version = subprocess.run([options.kubectl, "version", "--client"], capture_output=True, text=True).stdout
    print("k8s-check: " + " / ".join(version.split("\n")[:2]))
    documents = check_secret_example()
    for tree in TREES:
        objects = render(options.kubectl, tree)
        print(f"k8s-check: kubectl kustomize {tree}: {len(objects)} objects "
              f"({', '.join(sorted(o['kind'] for o in objects))})")
        check_tree(tree, objects)
        documents += [(tree, o) for o in objects]
    schema_validate(documents, options.kubernetes_version, options.crd_models)
    for line in problems:
        print(f"k8s-check: {line}", file=sys.stderr)
    if problems:
        print(f"k8s-check: FAILED ({len(problems)} problems)")
        return 1
    print(f"k8s-check: {', '.join(TREES)}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

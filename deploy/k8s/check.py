#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/k8s.

    python3 deploy/k8s/check.py [--require-schema] [--kubernetes-version 1.30.0]

1. Every *.yaml parses (PyYAML) and every object has apiVersion, kind and
   metadata.name and no namespace (the namespace is the operator's choice).
2. What the worker needs of them (README "Configuration", contract §7):
   replicas, probes on /healthz and /readyz, resources, a grace period longer
   than SHUTDOWN_TIMEOUT, non-root with a read-only root filesystem, settings
   from the ConfigMap, credentials from the Secret mounted as files
   (DATABASE_URL_FILE, KAFKA_PROPERTIES_FILE), scrape annotations that match the port,
   selectors of the Service and the PodDisruptionBudget that match the pods,
   a disruption budget that lets a drain evict a lone replica, the migrate
   init container (the upgrade procedure of deploy/README.md), no migrate
   Job beside it, a kustomization that lists existing files and leaves the
   example Secret out.
3. When `kubectl` is installed: `kubectl kustomize` builds the kustomization.
4. When the kubernetes-validate package is installed (pip install
   kubernetes-validate; it ships the schemas, no network needed): each object,
   and the kustomize output, is validated strictly (unknown fields rejected)
   against the Kubernetes API schemas. --require-schema makes its absence an
   error instead of a note.

Exit status 1 with one line per problem.
"""
import argparse
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
PORT = 9464
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


def load():
    objects = {}
    for path in sorted(HERE.glob("*.yaml")):
        try:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as error:
            problem(path.name, f"does not parse: {error}")
            continue
        for document in documents:
            kind = document.get("kind")
            name = (document.get("metadata") or {}).get("name")
            if kind == "Kustomization":
                objects[("Kustomization", path.name)] = (path.name, document)
                continue
            for field in ("apiVersion", "kind"):
                if not document.get(field):
                    problem(path.name, f"an object has no {field}")
            if not name:
                problem(path.name, f"a {kind} has no metadata.name")
            if "namespace" in (document.get("metadata") or {}):
                problem(path.name, f"{kind} {name} sets metadata.namespace; the manifests are namespace-less")
            objects[(kind, name)] = (path.name, document)
    return objects


def get(objects, kind, name):
    if (kind, name) not in objects:
        problem("deploy/k8s", f"no {kind} named {name}")
        return None, {}
    return objects[(kind, name)]


def check_pod(where, spec, containers_args, configmap, secret_names, key="containers"):
    """What the worker's containers and its init container have in common."""
    pod_security = spec.get("securityContext") or {}
    if pod_security.get("runAsNonRoot") is not True:
        problem(where, "pod securityContext.runAsNonRoot is not true")
    if not pod_security.get("runAsUser"):
        problem(where, "pod securityContext.runAsUser is not a non-zero uid")
    containers = spec.get(key) or []
    if len(containers) != 1:
        problem(where, f"expected exactly one container in {key}")
    for container in containers:
        cname = f"{where} {key} {container.get('name')}"
        if container.get("args") != containers_args:
            problem(cname, f"args are {container.get('args')}, expected {containers_args}")
        security = container.get("securityContext") or {}
        if security.get("readOnlyRootFilesystem") is not True:
            problem(cname, "readOnlyRootFilesystem is not true")
        if security.get("allowPrivilegeEscalation") is not False:
            problem(cname, "allowPrivilegeEscalation is not false")
        if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
            problem(cname, "capabilities are not all dropped")
        resources = container.get("resources") or {}
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (resources.get(bound) or {}):
                    problem(cname, f"no resources.{bound}.{resource}")
        env_from = container.get("envFrom") or []
        configmaps = [e["configMapRef"]["name"] for e in env_from if "configMapRef" in e]
        secrets = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
        if configmaps != [configmap]:
            problem(cname, f"envFrom ConfigMaps are {configmaps}, expected [{configmap!r}]")
        if secrets:
            problem(cname, f"envFrom Secrets {secrets}: credentials are mounted as files, not environment variables")
        env = {e.get("name"): e for e in container.get("env") or []}
        for name in ("DATABASE_URL", "KAFKA_PROPERTIES"):
            if name in env:
                problem(cname, f"{name} is set; the Secret's file is read through {name}_FILE")
        # The Secret mounted as files, which the *_FILE settings name.
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        mounts = [
            m for m in container.get("volumeMounts") or []
            if ((volumes.get(m.get("name")) or {}).get("secret") or {}).get("secretName") in secret_names
        ]
        if not mounts:
            problem(cname, f"the Secret {secret_names} is not mounted")
        for mount in mounts:
            if mount.get("readOnly") is not True:
                problem(cname, f"the Secret's mount {mount.get('mountPath')} is not readOnly")
        for name, key in (("DATABASE_URL_FILE", "DATABASE_URL"), ("KAFKA_PROPERTIES_FILE", "kafka.properties")):
            value = (env.get(name) or {}).get("value", "")
            if not any(value == f"{m.get('mountPath')}/{key}" for m in mounts):
                problem(cname, f"{name} is {value!r}, expected the Secret's {key} in its mount")
        if mounts and not pod_security.get("fsGroup"):
            problem(where, "no pod securityContext.fsGroup: the non-root user cannot read the Secret's files")
    return containers[0] if containers else {}


def check(objects):
    _, configmap = get(objects, "ConfigMap", "allocation-worker")
    settings = configmap.get("data") or {}
    for key, value in settings.items():
        if not isinstance(value, str):
            problem("configmap.yaml", f"{key} is not a string (quote it)")
    for key in ("DATABASE_URL", "KAFKA_PROPERTIES"):
        if key in settings:
            problem("configmap.yaml", f"{key} holds credentials; it belongs in the Secret")
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "HTTP_ADDR", "SHUTDOWN_TIMEOUT"):
        if key not in settings:
            problem("configmap.yaml", f"no {key}")
    host, _, port = settings.get("HTTP_ADDR", "").rpartition(":")
    if host != "0.0.0.0" or port != str(PORT):
        problem("configmap.yaml", f"HTTP_ADDR must be 0.0.0.0:{PORT} in a pod (probes, scraping)")

    secret_file, secret = get(objects, "Secret", "allocation-worker-secrets")
    secret_data = secret.get("stringData") or {}
    for key in ("DATABASE_URL", "kafka.properties"):
        if key not in secret_data:
            problem(secret_file or "secret", f"no stringData.{key}")
    if secret and not all("CHANGE_ME" in str(v) for v in secret_data.values()):
        problem(secret_file, "every example value must carry the CHANGE_ME placeholder")
    if secret_file and "example" not in secret_file:
        problem(secret_file, "the Secret's file must be named as an example")

    # --- Deployment ---------------------------------------------------------
    _, deployment = get(objects, "Deployment", "allocation-worker")
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    pod_labels = (template.get("metadata") or {}).get("labels") or {}
    pod_spec = template.get("spec") or {}
    if not isinstance(spec.get("replicas"), int) or spec["replicas"] < 2:
        problem("deployment.yaml", f"replicas is {spec.get('replicas')}: at least 2, so that one keeps consuming while the other moves")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        problem("deployment.yaml", "selector.matchLabels do not match the pod template's labels")
    try:
        shutdown = seconds(settings.get("SHUTDOWN_TIMEOUT", "20s"))
    except ValueError as error:
        problem("configmap.yaml", str(error))
        shutdown = 20
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    if not grace > shutdown:
        problem("deployment.yaml", f"terminationGracePeriodSeconds {grace} is not above SHUTDOWN_TIMEOUT ({shutdown}s)")
    container = check_pod("deployment.yaml", pod_spec, ["run"], "allocation-worker", ["allocation-worker-secrets"])
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    if ports.get("http-metrics") != PORT:
        problem("deployment.yaml", f"no container port http-metrics = {PORT}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = (container.get(probe) or {}).get("httpGet") or {}
        if http.get("path") != path:
            problem("deployment.yaml", f"{probe} does not GET {path}")
        if http.get("port") not in ("http-metrics", PORT):
            problem("deployment.yaml", f"{probe} does not use port http-metrics")
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    expected = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
    for key, value in expected.items():
        if annotations.get(key) != value:
            problem("deployment.yaml", f"pod annotation {key} is {annotations.get(key)!r}, expected {value!r}")
    memory_request = ((container.get("resources") or {}).get("requests") or {}).get("memory", "")
    if memory_request and not re.fullmatch(r"\d+Mi", memory_request):
        problem("deployment.yaml", f"memory request {memory_request!r}: expected Mi")
    if settings.get("SKIP_MIGRATIONS") != "true":
        problem("configmap.yaml", "SKIP_MIGRATIONS should be \"true\": the migrate init container applies them")
    # The upgrade procedure: each pod migrates in its init container before
    # its worker starts; a rolling update keeps the old pods until then.
    init = check_pod("deployment.yaml", pod_spec, ["migrate"], "allocation-worker",
                     ["allocation-worker-secrets"], key="initContainers")
    if init and init.get("image") != container.get("image"):
        problem("deployment.yaml", "the migrate init container must run the worker's image (its migrations)")
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    if (spec.get("strategy") or {}).get("type", "RollingUpdate") != "RollingUpdate" or rolling.get("maxUnavailable") != 0:
        problem("deployment.yaml", "strategy must be RollingUpdate with maxUnavailable 0: old pods run until a new one is ready")

    # --- Service ------------------------------------------------------------
    _, service = get(objects, "Service", "allocation-worker")
    service_spec = service.get("spec") or {}
    service_selector = service_spec.get("selector") or {}
    if not service_selector or any(pod_labels.get(k) != v for k, v in service_selector.items()):
        problem("service.yaml", "selector does not match the Deployment's pods")
    service_ports = {p.get("name"): p for p in service_spec.get("ports") or []}
    port = service_ports.get("http-metrics") or {}
    if port.get("port") != PORT:
        problem("service.yaml", f"no port http-metrics = {PORT}")
    if port.get("targetPort") not in ("http-metrics", PORT):
        problem("service.yaml", "targetPort does not name the container port http-metrics")

    # --- PodDisruptionBudget ------------------------------------------------
    _, pdb = get(objects, "PodDisruptionBudget", "allocation-worker")
    pdb_spec = pdb.get("spec") or {}
    # minAvailable: 1 blocks every drain of the node of a lone replica.
    if pdb_spec.get("maxUnavailable") != 1 or "minAvailable" in pdb_spec:
        problem("pdb.yaml", "expected maxUnavailable: 1 and no minAvailable, so that a drain can evict a lone replica")
    pdb_selector = (pdb_spec.get("selector") or {}).get("matchLabels") or {}
    if not pdb_selector or any(pod_labels.get(k) != v for k, v in pdb_selector.items()):
        problem("pdb.yaml", "selector does not match the Deployment's pods")

    # --- one upgrade procedure ----------------------------------------------
    # The init container migrates; a migrate Job applied beside the
    # Deployment would race it (nothing orders the two).
    for kind, name in objects:
        if kind == "Job":
            problem(objects[(kind, name)][0], f"Job {name}: the Deployment's init container migrates; a Job beside it is a second procedure")

    # --- kustomization ------------------------------------------------------
    kustomization_file, kustomization = objects.get(("Kustomization", "kustomization.yaml"), (None, {}))
    if not kustomization_file:
        problem("deploy/k8s", "no kustomization.yaml")
        return
    resources = kustomization.get("resources") or []
    for resource in resources:
        if not (HERE / resource).exists():
            problem("kustomization.yaml", f"resource {resource} does not exist")
    for file in sorted(p.name for p in HERE.glob("*.yaml")):
        if file in ("kustomization.yaml", secret_file):
            continue
        if file not in resources:
            problem("kustomization.yaml", f"{file} is not listed in resources")
    if secret_file in resources:
        problem("kustomization.yaml", f"{secret_file} must not be applied: it would overwrite the real Secret")
    if "namespace" in kustomization:
        problem("kustomization.yaml", "sets a namespace; the base is namespace-less")
    images = {i.get("name") for i in kustomization.get("images") or []}
    if container.get("image") not in images:
        problem("kustomization.yaml", f"images does not set {container.get('image')!r}")


def kustomize_build():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("k8s-check: note: kubectl not installed, kustomize build not checked")
        return None
    result = subprocess.run([kubectl, "kustomize", str(HERE)], capture_output=True, text=True)
    if result.returncode != 0:
        problem("kubectl kustomize", result.stderr.strip() or f"exit {result.returncode}")
        return None
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    print(f"k8s-check: kubectl kustomize: {len(built)} objects "
          f"({', '.join(sorted(d['kind'] for d in built))})")
    return built


def schema_validate(objects, built, version, required):
    try:
        import kubernetes_validate
    except ImportError:
        message = "kubernetes-validate not installed (pip install kubernetes-validate): API schemas not checked"
        if required:
            problem("schema", message)
        else:
            print(f"k8s-check: note: {message}")
        return
    documents = [(f, d) for (kind, _), (f, d) in objects.items() if kind != "Kustomization"]
    documents += [("kustomize output", d) for d in built or []]
    for where, document in documents:
        what = f"{where}: {document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problem(what, f"schema (Kubernetes {version}, strict): {path}: {error.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as error:
            problem(what, f"schema: {error}")
    print(f"k8s-check: kubernetes-validate {getattr(kubernetes_validate, '__version__', '?')}, strict, "
          f"Kubernetes {version}: {len(documents)} objects validated")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubernetes-version", default="1.30.0")
    parser.add_argument("--require-schema", action="store_true")
    options = parser.parse_args()
    objects = load()
    check(objects)
    built = kustomize_build()
    schema_validate(objects, built, options.kubernetes_version, options.require_schema)
    for line in problems:
        print(f"k8s-check: {line}", file=sys.stderr)
    if problems:
        print(f"k8s-check: FAILED ({len(problems)} problems)")
        return 1
    print(f"k8s-check: {len([k for k in objects if k[0] != 'Kustomization'])} objects in deploy/k8s: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

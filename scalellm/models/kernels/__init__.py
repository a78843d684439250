"""Our CPU kernels, built on first use with torch's C++ extension loader and cached on disk:

* q_q8.cpp: int4 / int8 weights x activations quantised to int8 per 32-block (llama.cpp's Q4_1 and Q8_0 x Q8
  dot products). torch ships no x86 kernel that multiplies by int8 activations: its packed int4 and int8
  matmuls widen every weight to float, which is fine for one token (memory-bound) but slow at 64, and on CPUs
  without native bf16 (AVX2) they take a slow path for float32 activations.
* q_f32.cpp: the same weights x float32 activations in float32 arithmetic, for prompt rows on CPUs without
  native bf16: the float32 reference's answer, batch-invariant by construction, faster than MKL's sgemm on
  the dense copy it replaces.
* paged_decode.cpp: attention reading K/V where they sit in the paged cache (no gathered copy).
* layer_ops.cpp: a decoder layer's elementwise parts fused (RMSNorm + residual add, RoPE + K/V cache write,
  silu * mul): at one token a step's time is mostly the dispatch of ~1500 small torch ops.
* decoder.cpp: a dense decoder stack's layers in one call, for steps whose rows all take the generated path: the
  kernels above in the Python layers' order, without the Python between them.
* argmax.cpp: the greedy sampler's argmax over a step's logits, torch.argmax's answer in two vectorised passes.
* team.cpp: the threads they run on for the engine's loop thread: the caller and workers of our own instead of
  OpenMP regions, so that a worker Triton's threads preempt never holds the engine up (team.h).

The same sources build for three instruction sets (simd.h): AVX-512 with VNNI; the same with AMX's tiles
(tiles.h: q_q8.cpp takes the int8 ones from 16 rows on, q_bf16.cpp the bf16 ones for every row); and AVX2 + FMA +
F16C, where the int8 dot products take two instructions instead of one. q_bf16.cpp's bf16 dot products run only
where the level has them (scalellm/models/cpu.py). ``load()`` builds the set of the level we run at
(``SCALELLM_ISA=avx2`` takes the AVX2 path on an AVX-512 machine). It returns None where none can run (no compiler,
SCALELLM_NO_KERNELS=1, a CPU without AVX2): callers keep torch's kernels. Numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

import torch

from scalellm.models import cpu

log = logging.getLogger(__name__)

SOURCES = [str(Path(__file__).with_name(name))
           for name in ("bindings.cpp", "q_q8.cpp", "q_f32.cpp", "q_bf16.cpp", "paged_decode.cpp", "layer_ops.cpp",
                         "decoder.cpp", "argmax.cpp", "team.cpp")]
# Instruction set -> its compiler flags, best first (the CPU flags each needs: scalellm/models/cpu.py's levels).
ISAS = {
    "amx": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c", "-mamx-tile",
            "-mamx-int8", "-mamx-bf16"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
BLOCK = 32  # weights per quantisation block: our kernels take K, the input features, a multiple of it


def cache_dir() -> Path:
    """build/kernels of the checkout (or SCALELLM_KERNEL_CACHE): compiled once per machine and torch version."""
    if "SCALELLM_KERNEL_CACHE" in os.environ:
        return Path(os.environ["SCALELLM_KERNEL_CACHE"])
    return Path(__file__).resolve().parents[3] / "build" / "kernels"


# The instruction set of ISAS each level of scalellm/models/cpu.py runs.
LEVEL_ISA = {"amx": "amx", "avx512_bf16": "avx512", "avx512": "avx512", "avx2": "avx2", "baseline": None}


def runnable_isas() -> list[str]:
    """The instruction sets of ISAS the level we run at allows, best first."""
    best = LEVEL_ISA[cpu.level()]
    return list(ISAS)[list(ISAS).index(best):] if best is not None else []


def best_isa() -> str | None:
    """What ``load()`` builds here: the set of the level we run at, or None (SCALELLM_NO_KERNELS=1)."""
    if os.environ.get("SCALELLM_NO_KERNELS") == "1":
        return None
    return LEVEL_ISA[cpu.level()]


def load(isa: str | None = None):
    """The compiled module for ``isa`` (default ``best_isa()``; bindings.cpp lists its functions), or None where
    the CPU or the toolchain cannot run it."""
    isa = isa or best_isa()
    return _build(isa) if isa is not None and isa in runnable_isas() else None


@functools.cache
def _build(isa: str):
    from torch.utils import cpp_extension

    directory = cache_dir() / f"torch-{torch.__version__}-{isa}"
    directory.mkdir(parents=True, exist_ok=True)
    scripts = str(Path(sys.executable).parent)  # pip's ninja, where the virtualenv is not activated
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    library = directory / f"scalellm_kernels_{isa}.so"
    inputs = [Path(source) for source in SOURCES] + list(Path(__file__).parent.glob("*.h"))
    compiling = not library.is_file() or library.stat().st_mtime < max(p.stat().st_mtime for p in inputs)
    if compiling:  # otherwise the load below takes a second or two
        log.warning("compiling our %s CPU kernels into %s (once per machine and torch version: 40 s to 2 min)",
                    isa, directory)
    started = time.monotonic()
    try:
        module = cpp_extension.load(f"scalellm_kernels_{isa}", SOURCES, extra_cflags=CFLAGS + ISAS[isa],
                                    build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja: torch's kernels still serve, just slower
        log.warning("WARNING: our %s CPU kernels did not build, so torch's kernels serve instead: several times "
                    "slower, and a request's answer may then depend on what it is batched with. Install g++ and "
                    "ninja, then run scripts/setup.sh. The build's error: %s", isa, exc)
        return None
    if compiling:
        log.warning("compiled our %s CPU kernels in %.0f s", isa, time.monotonic() - started)
    return module


def fits(head_dim: int, group: int) -> bool:
    """Whether paged_decode.cpp and layer_ops.cpp take a model with these heads (their fixed register tiles)."""
    return head_dim % 16 == 0 and head_dim <= 256 and group <= 8


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """(q int [N, K] in 0..2^bits-1, d and m [N, K/32]: w = q * d + m) to ``q_q8_mm``'s (wq, d, m): chunks of 16
    columns (N padded with zero columns), each block's weights in 8 groups of 4 as 16 columns x 4 bytes (4 bits:
    group t in the low nibbles, t + 4 in the high ones), d and m as 16 columns' float16 per block (q_q8.cpp).

    d and m in float16, as GGUF's Q4_1 and Q8_0 blocks keep them: at one token the step reads every weight
    byte from memory, and float32 scales would add a third to an int4 layer's bytes.
    """
    n, k = q.shape
    chunks, blocks = -(-n // 16), k // BLOCK
    q, d, m = (torch.nn.functional.pad(t, (0, 0, 0, chunks * 16 - n)) for t in (q.to(torch.uint8), d.half(), m.half()))
    groups = q.view(chunks, 16, blocks, 8, 4).permute(0, 2, 3, 1, 4)  # [chunk, block, group, column, 4]
    if bits == 4:
        groups = groups[:, :, :4] | (groups[:, :, 4:] << 4)
    scales = [t.view(chunks, 16, blocks).transpose(1, 2).contiguous() for t in (d, m)]
    return groups.contiguous().view(chunks, -1), *scales


def pack_panels(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """(q int [N, K], d and m [N, K/32]: w = q * d + m) to the 16-column k-major panels (wp, d, m) that ``q_f32_mm``
    and ``q_bf16_mm`` take (panels.h).

    d and m stay float32: q * d + m is then exactly the float32 weight the engine's reference holds.
    """
    n, k = q.shape
    padded = -(-n // 16) * 16
    q, d, m = (torch.nn.functional.pad(t, (0, 0, 0, padded - n)) for t in (q.to(torch.int32), d.float(), m.float()))
    panels = q.view(padded // 16, 16, k).transpose(1, 2)  # [P, K, 16]
    if bits == 4:
        panels = panels[..., 0::2] | (panels[..., 1::2] << 4)
    scales = [t.view(padded // 16, 16, k // 32).transpose(1, 2).contiguous() for t in (d, m)]
    return panels.to(torch.uint8).contiguous(), *scales


def pack_dense_panels(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A dense [N, K] weight to panels as it is: float32 for ``q_f32_mm`` (bits 32), bfloat16 for ``q_bf16_mm``
    (bits 16, k-pairs interleaved). Returns (wp, d, m) with empty d and m, as the coded packing's."""
    n, k = weight.shape
    padded = -(-n // 16) * 16
    panels = torch.nn.functional.pad(weight, (0, 0, 0, padded - n)).view(padded // 16, 16, k).transpose(1, 2)
    if weight.dtype == torch.bfloat16:  # [P, K/2, 2, 16] -> [P, K/2, 16, 2]
        panels = panels.reshape(padded // 16, k // 2, 2, 16).transpose(2, 3)
    elif weight.dtype != torch.float32:
        raise ValueError(f"dense panels hold float32 or bfloat16 weights (got {weight.dtype})")
    wp = panels.contiguous().view(torch.uint8).view(padded // 16, k, -1)
    return wp, torch.empty(0), torch.empty(0)


def has_bf16_dot() -> bool:
    """Whether ``q_bf16_mm`` runs here: an AVX-512 build at a level with bf16 dot products (every AMX CPU has them)."""
    return cpu.native_bf16() and best_isa() in ("amx", "avx512") and load() is not None

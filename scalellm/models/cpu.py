"""The instruction-set level we run at: what our kernels are built for and what the weight formats assume.

Levels, best first (the CPU flags each needs, as /proc/cpuinfo names them):

* ``amx``: AMX tiles (int8 and bf16), and everything below (Intel Xeon from Sapphire Rapids);
* ``avx512_bf16``: AVX-512 with VNNI and bf16 dot products (AMD EPYC from Zen 4, Intel Cooper Lake);
* ``avx512``: AVX-512 with VNNI (Intel Cascade Lake, Ice Lake);
* ``avx2``: AVX2 + FMA + F16C (AMD EPYC Zen 2/3, Intel Haswell and later);
* ``baseline``: anything else: torch's own kernels only.

``SCALELLM_ISA=<level>`` runs at most that level, never above what the CPU has, so one machine can take every path
below its best (tests/test_isa_paths.py does). ``TORCH_ENV`` takes torch's own kernels down the same path
(``ATEN_CPU_CAPABILITY``, oneDNN's ``ONEDNN_MAX_CPU_ISA``); both are read once, when torch starts, so they go into
a new process's environment.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c")
LEVELS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_tile", "amx_int8", "amx_bf16", "avx512_bf16", *_AVX512),
    "avx512_bf16": ("avx512_bf16", *_AVX512),
    "avx512": _AVX512,
    "avx2": ("avx2", "fma", "f16c"),
    "baseline": (),
}
TORCH_ENV: dict[str, dict[str, str]] = {
    "amx": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def missing_flags(level: str) -> list[str]:
    """The flags ``level`` needs that this CPU lacks."""
    return [flag for flag in LEVELS[level] if flag not in cpu_flags()]


def supported_levels() -> list[str]:
    """The levels this CPU runs, best first (``baseline`` always)."""
    return [level for level in LEVELS if not missing_flags(level)]


def level() -> str:
    """The level we run at: the CPU's best, or SCALELLM_ISA where that is lower."""
    best = supported_levels()[0]
    wanted = os.environ.get("SCALELLM_ISA")
    if wanted is None:
        return best
    if wanted not in LEVELS:
        raise ValueError(f"SCALELLM_ISA must be one of {', '.join(LEVELS)} (got {wanted!r})")
    order = list(LEVELS)
    return order[max(order.index(wanted), order.index(best))]


def native_bf16() -> bool:
    """bf16 dot products in hardware at our level (AVX-512 BF16, AMX): bf16 activations pay there."""
    return level() in ("amx", "avx512_bf16")

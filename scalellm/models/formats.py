"""Weight formats: the dtype names an engine directory may record, and what they mean on this CPU.

An engine directory records ``dtype`` (float32 | bfloat16 | float16 | auto) and ``quantize`` (none | int8 |
int4) in scalellm_engine.json. ``auto`` and the quantised formats are resolved when the engine LOADS, from what
this machine's CPU can do, so one engine directory serves well on every machine kind:

* a CPU with native bf16 dot products (avx512_bf16 or AMX) computes in bfloat16: GEMMs ran 4x faster than
  float32 at 64 tokens on a Zen 5 EPYC (avx512_bf16, no AMX; docs/benchmarks.md), and the int8/int4 packed
  matmuls are only fast with bf16 activations there (float32 activations take a slow path, 7-20x slower);
* any other CPU (AVX2) computes in float32: bf16 is emulated there (1-2.5 GFLOP/s against 120-160 for float32
  on an AVX2 EPYC), and so are torch's packed kernels' bf16 paths. ``quantize`` holds there only where our
  int8 kernels build (scalellm/models/kernels, AVX2 build): they take float32 activations, and at one token
  the step reads a quarter of float32's weight bytes (docs/benchmarks.md); elsewhere float32 weights.

Nothing built with these formats can hit an illegal instruction: torch's ATen kernels dispatch on the CPU
themselves, and ours are built only for an instruction set /proc/cpuinfo lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm.models import cpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
QUANTIZE = ("none", "int8", "int4")


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise "bfloat16" / torch.bfloat16 to "bfloat16"; reject dtypes an engine can't hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return name


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX at the level we run at (scalellm/models/cpu.py): the CPU multiplies bf16 in hardware."""
    return cpu.native_bf16()


@dataclass(frozen=True)
class WeightFormat:
    """What the model computes in on this machine: activations/KV dtype and the linear layers' weights."""

    dtype: torch.dtype
    quantize: str = "none"  # none | int8 (per output channel) | int4 (group-wise, GROUP_SIZE)

    @property
    def name(self) -> str:
        dtype = dtype_name(self.dtype)
        return dtype if self.quantize == "none" else f"{self.quantize} weights, {dtype} activations"


def resolve_format(dtype: str, quantize: str = "none", device: str = "cpu", q8_kernels: bool = False) -> WeightFormat:
    """The format to load an engine recorded as (dtype, quantize) in, on this machine. ``q8_kernels``: our int8
    kernels will run the quantised layers (they take float32 activations as well as bfloat16)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} (got {quantize!r})")
    if dtype != AUTO:
        dtype_name(dtype)
    if device != "cpu":
        if quantize != "none":
            raise ValueError(f"quantize={quantize!r} is implemented for the CPU only (device {device!r})")
        return WeightFormat(torch.bfloat16 if dtype == AUTO else DTYPES[dtype])
    native_bf16 = cpu_has_native_bf16()
    if dtype == AUTO:
        if native_bf16:
            return WeightFormat(torch.bfloat16, quantize)
        return WeightFormat(torch.float32, quantize if q8_kernels else "none")  # torch's would emulate bf16
    if quantize != "none" and DTYPES[dtype] != torch.bfloat16 and not (q8_kernels and DTYPES[dtype] == torch.float32):
        raise ValueError(f"quantize={quantize!r} computes in bfloat16 activations, or float32 ones on our int8 "
                         f"kernels (AVX2 or AVX-512, where they build); got dtype {dtype!r}")
    return WeightFormat(DTYPES[dtype], quantize)

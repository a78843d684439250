"""Weight-only int8 / int4 linear layers on torch's packed CPU matmuls, and the swap that installs them.

* int8: per output channel, symmetric (w = q * s), ``aten._weight_int8pack_mm``.
* int4: groups of GROUP_SIZE along the input dimension, asymmetric (w = (q - 8) * s + z, q in 0..15),
  ``aten._weight_int4pack_mm_for_cpu``. GGUF's Q4_1 blocks are exactly this (32 weights, w = q * d + m,
  so s = d and z = m + 8d), and a GGUF-built engine holds those blocks dequantised: re-deriving s and z
  from each group's min and max gives back the very same q, so int4 loses nothing against the float32
  reference beyond bf16 rounding of s and z (tests/test_weight_formats.py checks this).

Packed kernels win while a step is memory-bound (a few tokens); bf16 GEMMs beat them from ~8 tokens on a Zen 5
EPYC (2x at 32; docs/benchmarks.md). So each packed layer may also keep its dense weight (the float32 reference
cast to bf16) behind a per-model DenseSwitch that the model runner flips per step: dense for every step that
computes prompt tokens (so a prompt computes the same with or without a prefix-cache hit) or more than a few
tokens, packed for small decode-only steps. The two agree to about bf16 rounding, not bit for bit, so a request's
greedy text then depends on what it was batched with; that is why it is opt-in (EngineConfig.dense_above_tokens).

The lm_head (tied to the embedding in SmolLM2, Q8_0 in its GGUF) is int8 in both formats: int4 would add
error where the GGUF itself keeps 8 bits, and at one token it is the largest single matrix (49152 x 576).
The embedding lookup stays dense (a gather reads only the step's rows). MoE routers stay dense (tiny).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 32
INT4_INNER_K_TILES = 1  # the CPU packing ignores tiling beyond this; 1 is what its kernel expects
QUANTIZED_FILE = "weights-{quantize}.safetensors"  # an engine directory's packed weights (built once)


@dataclass
class DenseSwitch:
    """Shared by all packed linears of one model: on = run this step on the dense weights."""

    on: bool = False


class PackedLinear(nn.Module):
    """A weight-only quantised linear; optionally its dense weight too, used while ``switch.on``."""

    in_features: int
    out_features: int
    dense: torch.Tensor | None = None  # not a buffer: never saved with the packed weights
    switch: DenseSwitch | None = None

    def keep_dense(self, weight: torch.Tensor, switch: DenseSwitch) -> None:
        self.dense, self.switch = weight, switch

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.switch is not None and self.switch.on:
            out = F.linear(x2, self.dense)
        else:
            out = self.packed_mm(x2)
        return out.view(*x.shape[:-1], self.out_features)


class Int8Linear(PackedLinear):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N], the activations' dtype
        self.out_features, self.in_features = weight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Linear:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        return cls((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)


def int4_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """(q int32 [N, K] in 0..15, s [N, K/g], z [N, K/g]) with w ~= (q - 8) * s + z, from each group's min/max."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    s = (high - low) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: q = 0 reproduces it
    q = ((w - low[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, s, low + 8 * s


class Int4Linear(PackedLinear):
    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # torch's CPU int4 packing of q [N, K]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/g, N, 2], the activations' dtype
        self.group_size = group_size
        self.out_features = weight.shape[0]
        self.in_features = scales_and_zeros.shape[0] * group_size

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Linear:
        q, s, z = int4_groups(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
        return cls(packed, torch.stack([s.t(), z.t()], dim=-1).contiguous(), group_size)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_model(model: nn.Module, quantize: str, dtype: torch.dtype,
                   stored: dict[str, torch.Tensor] | None = None, dense: DenseSwitch | None = None) -> None:
    """Swap the decoder's dense linear layers (and its experts) for packed ones, in place.

    ``stored``: the packed buffers of an earlier call (``packed_state``), loaded instead of re-quantising.
    Scales end up in ``dtype``, the activations' dtype the kernels require. ``dense``: keep each dense weight
    (it must already be in ``dtype``) for the steps this switch turns on; None = packed kernels only.
    """
    from scalellm.models.moe import SparseMoE

    if quantize == "none":
        return

    def make(path: str, weight: torch.Tensor, kind: str) -> nn.Module:
        cls = LINEARS[kind]
        if stored is not None:
            buffers = {name.removeprefix(f"{path}."): t for name, t in stored.items() if name.startswith(f"{path}.")}
            linear = cls(*(buffers[name] for name in ("weight", "scales_and_zeros" if kind == "int4" else "scales")))
        else:
            linear = cls.quantize(weight)
        for name, buffer in linear.named_buffers():
            if buffer.is_floating_point():
                setattr(linear, name, buffer.to(dtype))
        if dense is not None:
            linear.keep_dense(weight.detach(), dense)
        return linear

    for path, module in list(model.named_modules()):
        if isinstance(module, SparseMoE):
            module.quantize(lambda e, name, w, p=path: make(f"{p}.{name}.{e}", w, quantize))
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{path}.{name}" if path else name
                setattr(module, name, make(full, child.weight, "int8" if name == "lm_head" else quantize))


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed linears' buffers of a quantised model (what ``quantize_model(stored=...)`` takes back)."""
    return {name: t.contiguous() for path, m in model.named_modules() if isinstance(m, tuple(LINEARS.values()))
            for name, t in ((f"{path}.{n}", b) for n, b in m.named_buffers())}

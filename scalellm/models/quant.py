"""Weight-only int8 / int4 linear layers on torch's packed CPU matmuls, and the swap that installs them.

* int8: per output channel, symmetric (w = q * s), ``aten._weight_int8pack_mm``.
* int4: groups of GROUP_SIZE along the input dimension, asymmetric (w = (q - 8) * s + z, q in 0..15),
  ``aten._weight_int4pack_mm_for_cpu``. GGUF's Q4_1 blocks are exactly this (32 weights, w = q * d + m,
  so s = d and z = m + 8d), and a GGUF-built engine holds those blocks dequantised: re-deriving s and z
  from each group's min and max gives back the very same q, so int4 loses nothing against the float32
  reference beyond bf16 rounding of s and z (tests/test_weight_formats.py checks this).

The lm_head (tied to the embedding in SmolLM2, Q8_0 in its GGUF) is int8 in both formats: int4 would add
error where the GGUF itself keeps 8 bits, and at one token it is the largest single matrix (49152 x 576).
The embedding lookup stays dense (a gather reads only the step's rows). MoE routers stay dense (tiny).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZE = 32
INT4_INNER_K_TILES = 1  # the CPU packing ignores tiling beyond this; 1 is what its kernel expects


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        return out.view(*x.shape[:-1], self.out_features)


def int4_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """(q int32 [N, K] in 0..15, s [N, K/g], z [N, K/g]) with w ~= (q - 8) * s + z, from each group's min/max."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().double().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    s = (high - low) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: q = 0 reproduces it
    q = ((w - low[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, s.float(), (low + 8 * s).float()


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        q, s, z = int4_groups(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)
        # [K/g, N, 2]: the kernel's layout of (scale, zero) per group and output channel.
        self.register_buffer("scales_and_zeros", torch.stack([s.t(), z.t()], dim=-1).contiguous().to(dtype))
        self.group_size = group_size
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features), self.weight, self.group_size, self.scales_and_zeros
        )
        return out.view(*x.shape[:-1], self.out_features)


def quantized_linear(weight: torch.Tensor, quantize: str, dtype: torch.dtype) -> nn.Module:
    if quantize == "int8":
        return Int8Linear(weight, dtype)
    if quantize == "int4":
        return Int4Linear(weight, dtype)
    raise ValueError(f"unknown quantize {quantize!r}")


def quantize_model(model: nn.Module, quantize: str, dtype: torch.dtype) -> None:
    """Swap the decoder's dense linear layers (and its experts) for packed ones, in place."""
    from scalellm.models.moe import SparseMoE

    if quantize == "none":
        return
    for module in list(model.modules()):
        if isinstance(module, SparseMoE):
            module.quantize(lambda w: quantized_linear(w, quantize, dtype))
            continue
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            head = name == "lm_head"
            setattr(module, name, quantized_linear(child.weight, "int8" if head else quantize, dtype))

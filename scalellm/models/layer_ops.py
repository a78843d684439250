"""A decoder layer's operations other than its matmuls, on torch or on our CPU kernels: chosen once, at load.

``TorchOps``: plain torch (RMSNorm, RoPE, K/V written through ``index_copy_``, attention as gathers and matmuls or
SDPA, scalellm/models/attention.py). ``KernelOps`` (scalellm/models/kernels): RMSNorm with the residual add fused,
RoPE fused with the K/V cache write, silu * mul, and attention reading every row's keys where they sit in the
paged cache (``in_place``: the model runner then lays every row of a step out as one query over its own
sequence, prompt rows included, so a row's result depends only on its sequence, never on how its prompt was
chunked, what the prefix cache held or what it was batched with). At one token a step is ~1500 small torch ops,
and their dispatch, not their arithmetic, is most of it; the kernels replace ~35 of them per layer with 4.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from scalellm.models.attention import paged_attention
from scalellm.models.step import Step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel, same result
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # x: [T, heads, D]
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TorchOps:
    in_place = False  # attention gathers K/V: decodes and prefill chunks are laid out apart (QueryGroup, PrefillChunk)

    def rope_inputs(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """What ``attention`` takes for RoPE, looked up once per step and shared by all layers."""
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta (in place: the residual stream), then the RMSNorm of x."""
        return rms_norm(x.add_(delta), weight, eps)

    def attention(self, qkv: torch.Tensor, rope: Any, kv_cache: torch.Tensor, step: Step, heads: int, kv_heads: int,
                  scale: float) -> torch.Tensor:
        """qkv [T, (H + 2 KVH) D] -> RoPE, the step's K/V into the cache, attention: [T, H D]."""
        t, dim = qkv.shape[0], kv_cache.shape[-1]
        qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        qk = apply_rope(qk.unflatten(-1, (heads + kv_heads, dim)), rope)  # q and k at once
        q, k = qk.split([heads, kv_heads], dim=1)
        return paged_attention(q, k, v.unflatten(-1, (kv_heads, dim)), kv_cache, step, scale).reshape(t, heads * dim)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class KernelOps:
    """Our kernels, rounded to the activations' dtype wherever torch's ops round (layer_ops.cpp)."""

    in_place = True  # every row of a step is one query over its own sequence's keys, read in place

    def __init__(self, module: Any, bf16_dot: bool = False) -> None:
        self.ops = module
        self.bf16_dot = bf16_dot  # attention scores on bf16 dot products (a bf16 cache, AVX-512 BF16 or AMX)

    def rope_inputs(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        return cos, sin, positions  # rope_kv reads the float32 tables itself

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.rms_norm(x, None, weight, eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.rms_norm(x, delta, weight, eps)

    def attention(self, qkv: torch.Tensor, rope: Any, kv_cache: torch.Tensor, step: Step, heads: int, kv_heads: int,
                  scale: float) -> torch.Tensor:
        q = self.ops.rope_kv(qkv, *rope, kv_cache, step.slot_mapping, heads, kv_heads)
        (rows,) = step.queries  # the model runner lays an in-place step out as one group
        o = self.ops.paged_decode(q, kv_cache, rows.blocks, rows.lengths, step.block_size, scale, self.bf16_dot)
        return o.view(qkv.shape[0], -1)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_mul(gate_up)


LayerOps = TorchOps | KernelOps

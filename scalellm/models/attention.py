"""Paged attention in plain PyTorch.

The KV cache of one layer is a flat tensor ``[2, num_slots, num_kv_heads, head_dim]`` where slot
``block * block_size + offset`` holds one token.  A step's new tokens are first written at their slots
(``slot_mapping``), then each sequence attends over its own slots, gathered through its block table.

A step mixes two shapes of work, so it is split into groups:
* decodes: one query each, batched into one SDPA call over keys padded to the longest context;
* prefill chunks: many queries of one sequence, causal over its cached prefix plus the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    token_index: torch.Tensor  # [B] rows of the step's flat token batch
    slots: torch.Tensor  # [B, K] cache slots of each sequence's context (padded)
    mask: torch.Tensor  # [B, 1, 1, K] True where a key is real


@dataclass
class PrefillChunk:
    start: int  # rows [start, start + num_new) of the flat token batch
    num_new: int
    slots: torch.Tensor  # [context_len] slots of the whole context, chunk included


@dataclass
class AttentionBatch:
    """Everything attention needs for one engine step (built by the model runner)."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: DecodeGroup | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, S, KVH, D]
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend; returns [T, H, D]."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    if batch.decode is not None:
        d = batch.decode
        qd = q[d.token_index].unsqueeze(2)  # [B, H, 1, D]
        kd = k_cache[d.slots].transpose(1, 2)  # [B, KVH, K, D]
        vd = v_cache[d.slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d.mask, scale=scale, enable_gqa=gqa)
        out[d.token_index] = o.squeeze(2)
    for p in batch.prefills:
        qp = q[p.start : p.start + p.num_new].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kp = k_cache[p.slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        vp = v_cache[p.slots].transpose(0, 1).unsqueeze(0)
        ctx = p.slots.shape[0]
        if ctx == p.num_new:
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # a later chunk: query i sits at position ctx - n + i and sees keys up to it
            qpos = torch.arange(ctx - p.num_new, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= qpos
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[p.start : p.start + p.num_new] = o.squeeze(0).transpose(0, 1)
    return out

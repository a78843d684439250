"""Paged attention in plain PyTorch.

The KV cache of one layer is a flat tensor ``[2, num_slots, num_kv_heads, head_dim]`` (K and V) where slot
``block * block_size + offset`` holds one token.  A step's new tokens are first written at their slots
(``slot_mapping``, one ``index_copy_`` for K and V together), then each sequence attends over its own slots.

Everything index-shaped is built once per step by the model runner (AttentionBatch) and shared by all layers;
a layer only gathers K/V through those indices (one gather for K and V) and calls SDPA. A step mixes two
shapes of work, so it is split into groups:
* decodes: one query each, batched into SDPA calls over keys padded to the group's longest context; decodes
  are grouped by context length (a group never pads a context to more than twice its length), so the cost
  follows the real contexts, not the batch's longest one;
* prefill chunks: many queries of one sequence, causal over its cached prefix plus the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    token_index: torch.Tensor | None  # [B] rows of the step's flat token batch; None = all rows, in order
    slots: torch.Tensor  # [B, K] cache slots of each sequence's context (padded)
    mask: torch.Tensor | None  # [B, 1, 1, K] True where a key is real; None = no padding


@dataclass
class PrefillChunk:
    start: int  # rows [start, start + num_new) of the flat token batch
    num_new: int
    slots: torch.Tensor  # [context_len] slots of the whole context, chunk included
    mask: torch.Tensor | None = None  # [num_new, context_len] for a later chunk; None = plain causal


@dataclass
class AttentionBatch:
    """Everything attention needs for one engine step (built by the model runner, shared by all layers)."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decodes: list[DecodeGroup] = field(default_factory=list)
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
    kv_cache.index_copy_(1, batch.slot_mapping, torch.stack([k, v]))
    gqa = q.shape[1] != k.shape[1]
    only_decodes = not batch.prefills and len(batch.decodes) == 1 and batch.decodes[0].token_index is None
    out = None if only_decodes else torch.empty_like(q)
    for d in batch.decodes:
        qd = (q if d.token_index is None else q[d.token_index]).unsqueeze(2)  # [B, H, 1, D]
        kv = kv_cache[:, d.slots].transpose(2, 3)  # [2, B, KVH, K, D]
        o = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=d.mask, scale=scale, enable_gqa=gqa)
        if out is None:
            return o.squeeze(2)
        out[d.token_index] = o.squeeze(2)
    for p in batch.prefills:
        qp = q[p.start : p.start + p.num_new].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kv = kv_cache[:, p.slots].transpose(1, 2).unsqueeze(1)  # [2, 1, KVH, ctx, D]
        if p.mask is None:
            o = F.scaled_dot_product_attention(qp, kv[0], kv[1], is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qp, kv[0], kv[1], attn_mask=p.mask, scale=scale, enable_gqa=gqa)
        out[p.start : p.start + p.num_new] = o.squeeze(0).transpose(0, 1)
    return out


def prefill_mask(num_new: int, context_len: int) -> torch.Tensor | None:
    """A later chunk: query i sits at position context_len - num_new + i and sees keys up to it."""
    if num_new == context_len:
        return None
    qpos = torch.arange(context_len - num_new, context_len).unsqueeze(1)
    return torch.arange(context_len).unsqueeze(0) <= qpos


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices into lengths, grouped so that no group pads a context to more than twice its length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and 2 * lengths[i] >= lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups

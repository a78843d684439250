"""Paged attention in plain PyTorch (``TorchOps``; our kernel reads the cache in place instead: layer_ops.py).

The KV cache of one layer is a tensor ``[2, num_kv_heads, num_slots, head_dim]`` (K and V) where slot
``block * block_size + offset`` holds one token.  A step's new tokens are first written at their slots
(``slot_mapping``, one ``index_copy_`` for K and V together), then each sequence attends over its own slots.
Heads come before slots so that a gather of slots yields K and V already in the layout the attention matmuls
read (no transposed copies per layer).

Everything index-shaped is built once per step by the model runner (``Step``) and shared by all layers. A step
mixes two shapes of work:
* decodes: one query each (``QueryGroup``), batched into matmuls over keys padded to the group's longest context;
  decodes are grouped by context length (a group never pads a context to more than twice its length), so the cost
  follows the real contexts, not the batch's longest one. They gather whole blocks (block_size * head_dim
  contiguous values per index): 3.8x faster than gathering slot by slot at 64 sequences of 192 tokens;
* prefill chunks: many queries of one sequence, causal over its cached prefix plus the chunk (``PrefillChunk``).
  SDPA's result for a token differs in the last bits with the chunk it is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalellm.models.step import Step


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, KVH, S, D]
    step: Step,
    scale: float,
) -> torch.Tensor:
    """Write the step's K/V into the cache (in its dtype), then attend in q's dtype; returns [T, H, D]."""
    kv_cache.index_copy_(2, step.slot_mapping, torch.stack([k, v]).transpose(1, 2).to(kv_cache.dtype))
    gqa = q.shape[1] != k.shape[1]  # prefill chunks: SDPA groups the heads itself
    only_decodes = not step.prefills and len(step.queries) == 1 and step.queries[0].token_index is None
    out = None if only_decodes else torch.empty_like(q)
    kvh, dim = kv_cache.shape[1], kv_cache.shape[-1]
    by_block = kv_cache.view(2, kvh, -1, step.block_size * dim)
    for d in step.queries:
        b, width = d.blocks.shape
        kv = by_block.index_select(2, d.blocks.flatten()).view(2, kvh, b, width * step.block_size, dim).to(q.dtype)
        o = decode_attention(q if d.token_index is None else q[d.token_index], kv[0], kv[1], d.bias, scale)
        if out is None:
            return o
        out[d.token_index] = o
    for p in step.prefills:
        qp = q[p.start : p.start + p.num_new].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kv = kv_cache.index_select(2, p.slots).unsqueeze(1).to(q.dtype)  # [2, 1, KVH, ctx, D]
        if p.mask is None:
            o = F.scaled_dot_product_attention(qp, kv[0], kv[1], is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qp, kv[0], kv[1], attn_mask=p.mask, scale=scale, enable_gqa=gqa)
        out[p.start : p.start + p.num_new] = o.squeeze(0).transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,  # [B, H, D], one query per sequence
    k: torch.Tensor,  # [KVH, B, K, D]
    v: torch.Tensor,
    bias: torch.Tensor | None,  # [B, 1, K]
    scale: float,
) -> torch.Tensor:
    """Two batched matmuls and a float32 softmax, batched over (KV head, sequence); the query heads of a KV
    head form the rows of its matmul (GQA without repeating K/V).

    Not SDPA: for one query per sequence, torch's CPU flash kernel took 13.6 ms per layer in bf16 at B = 64,
    K = 200 on a Zen 5 EPYC against 0.6 ms for this (and 2.2 vs 1.7 ms in float32).
    """
    b, h, d = q.shape
    kvh = k.shape[0]
    qg = q.view(b, kvh, h // kvh, d).transpose(0, 1)  # [KVH, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [KVH, B, G, K]
    if bias is not None:
        scores = scores + bias
    o = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [KVH, B, G, D]
    return o.transpose(0, 1).reshape(b, h, d)


def decode_bias(lengths: torch.Tensor, width: int) -> torch.Tensor | None:
    """[B, 1, width] float32: 0 where key j < the sequence's length, -inf after (padding); None if no padding."""
    if bool((lengths == width).all()):
        return None
    pad = torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)
    return torch.zeros(pad.shape).masked_fill_(pad, float("-inf")).view(len(lengths), 1, width)


def kv_cache_shape(num_slots: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_kv_heads, num_slots, head_dim)


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

"""One vectorised sampling pass over the batch's logits.

Randomness is counter-based: a request's uniform draw for output position ``n`` is a hash of
(seed, n), so its text for a given seed does not depend on what else is in the batch, and a preempted
request recomputed later samples the same tokens again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm.engine.sequence import Sequence
from scalellm.models import kernels

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
TOP_P_CANDIDATES = (256, 4096)  # the most likely tokens top-p looks among, in turn, before sorting a row whole


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform_from_counter(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """splitmix64(seed * golden + counter) -> float64 uniform in [0, 1); int64 arithmetic wraps."""
    z = seeds * _GOLDEN + counters
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() / float(1 << 53)


@dataclass
class SampleResult:
    token_ids: list[int]
    log_probs: list[float] | None  # model log-probability of each sampled token (None if nobody asked)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if not rows:
        return
    vocab = logits.shape[1]
    for group, with_prompt in (("output", False), ("all", True)):
        width = max(len(seqs[i].token_ids if with_prompt else seqs[i].output_ids) for i in rows)
        ids = torch.full((len(rows), max(width, 1)), vocab, dtype=torch.long)
        for r, i in enumerate(rows):
            toks = seqs[i].token_ids if with_prompt else seqs[i].output_ids
            ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        counts = torch.zeros(len(rows), vocab + 1).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
        counts = counts[:, :vocab]
        sub = logits[rows]
        if group == "output":
            presence = torch.tensor([seqs[i].params.presence_penalty for i in rows]).unsqueeze(1)
            frequency = torch.tensor([seqs[i].params.frequency_penalty for i in rows]).unsqueeze(1)
            sub -= frequency * counts + presence * (counts > 0)
        else:
            rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows]).unsqueeze(1).expand_as(sub)
            seen = counts > 0
            sub = torch.where(seen & (sub > 0), sub / rep, torch.where(seen, sub * rep, sub))
        logits[rows] = sub


def _ban_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """End-of-sequence before min_tokens, and the last token of any bad sequence whose prefix just occurred."""
    rows, cols = [], []
    for i, s in enumerate(seqs):
        p = s.params
        if len(s.output_ids) < p.min_tokens:
            for t in p.stop_token_ids:
                rows.append(i)
                cols.append(t)
        for bad in p.bad_sequences:
            k = len(bad) - 1
            if k == 0 or (len(s.output_ids) >= k and tuple(s.output_ids[-k:]) == bad[:-1]):
                rows.append(i)
                cols.append(bad[-1])
    if rows:
        logits[rows, cols] = float("-inf")


def _edits_logits(seq: Sequence) -> bool:
    """Whether ``apply_penalties`` or ``_ban_tokens`` may change this sequence's row."""
    p = seq.params
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or bool(p.bad_sequences) or len(seq.output_ids) < p.min_tokens)


def _outside_nucleus(probs: torch.Tensor, p: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True for each token outside its row's nucleus as far as the row's ``candidates`` most likely tokens tell,
    and the rows whose nucleus may reach past them (their last candidate kept)."""
    top, order = probs.topk(min(candidates, probs.shape[1]), dim=-1)
    keep = (top.cumsum(dim=-1) - top) <= p.unsqueeze(1)
    drop = torch.ones_like(probs, dtype=torch.bool).scatter_(1, order, ~keep)
    return drop, keep[:, -1].nonzero().flatten()


def apply_top_p(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``scaled`` with every token outside its row's nucleus at -inf: the most likely tokens whose mass strictly
    ahead of them is at most top_p (the most likely token always stays). Rows with top_p >= 1 are untouched.

    A nucleus is mostly a few tokens (SmolLM2 on English prose at temperature 1, top_p 0.9: median 46, 16% of
    rows over 256), so each row looks for it among its most likely tokens first (``topk`` of each size in
    TOP_P_CANDIDATES) and is sorted whole only when it reaches past them. Sorting all 64 rows of a 49k
    vocabulary took 143 ms on 2 threads, as long as the model's decode step."""
    rows = (top_p < 1.0).nonzero().flatten()
    every = len(rows) == len(top_p)
    probs = (scaled if every else scaled[rows]).softmax(dim=-1)
    p, vocab = top_p[rows], probs.shape[1]
    drop, wider = _outside_nucleus(probs, p, TOP_P_CANDIDATES[0])
    for candidates in (*TOP_P_CANDIDATES[1:], vocab):
        if not len(wider):
            break
        drop[wider], more = _outside_nucleus(probs[wider], p[wider], candidates)
        wider = wider[more]
    if every:
        return scaled.masked_fill(drop, float("-inf"))
    scaled = scaled.clone()
    scaled[rows] = scaled[rows].masked_fill(drop, float("-inf"))
    return scaled


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token: torch.argmax's answer, on our kernel where it builds (torch's takes 4-8 ms of a
    ~100 ms step at 64 rows on one thread)."""
    module = kernels.load()
    if module is not None and logits.dtype == torch.float32 and logits.is_contiguous() and logits.shape[1] > 0:
        return module.argmax_rows(logits)
    return logits.argmax(dim=-1)


def wide_passes(seqs: list[Sequence]) -> bool:
    """Whether ``sample`` makes passes over whole rows beyond the argmax (sampling, log-probs, edits)."""
    return any(not s.params.greedy or s.params.return_log_probs or _edits_logits(s) for s in seqs)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """logits: [B, V] float32 for the B sequences that sample this step."""
    want_log_probs = any(s.params.return_log_probs for s in seqs)
    model_log_probs = torch.log_softmax(logits, dim=-1) if want_log_probs else None
    if any(_edits_logits(s) for s in seqs):  # penalties and bans write into the logits: a copy, not the caller's
        logits = logits.clone()  # (64 rows of a 49k vocabulary: 12.6 MB a step, skipped when nobody needs it)
        apply_penalties(logits, seqs)
        _ban_tokens(logits, seqs)

    greedy = torch.tensor([s.params.greedy for s in seqs])
    chosen = argmax(logits)
    if not bool(greedy.all()):
        temperature = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs]).unsqueeze(1)
        scaled = logits / temperature
        top_k = torch.tensor([s.params.top_k for s in seqs])
        if bool((top_k > 0).any()):
            k_max = int(top_k.max())
            kth = scaled.topk(min(k_max, scaled.shape[1]), dim=-1).values
            kth = kth.gather(1, (top_k.clamp(min=1, max=kth.shape[1]) - 1).unsqueeze(1))
            scaled = torch.where((top_k > 0).unsqueeze(1) & (scaled < kth), float("-inf"), scaled)
        top_p = torch.tensor([s.params.top_p for s in seqs])
        if bool((top_p < 1.0).any()):
            scaled = apply_top_p(scaled, top_p)
        min_p = torch.tensor([s.params.min_p for s in seqs])
        if bool((min_p > 0).any()):
            probs = scaled.softmax(dim=-1)
            floor = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
        seeds = torch.tensor([s.params.seed for s in seqs], dtype=torch.long)
        counters = torch.tensor([len(s.output_ids) for s in seqs], dtype=torch.long)
        u = (uniform_from_counter(seeds, counters) * cdf[:, -1].double()).float().unsqueeze(1)
        sampled = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.shape[1] - 1)
        chosen = torch.where(greedy, chosen, sampled)

    log_probs = None
    if model_log_probs is not None:
        log_probs = model_log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    return SampleResult(chosen.tolist(), log_probs)

"""Engine outputs -> ``llm`` response tensors, in tensorrtllm_backend's shapes ([batch, beam, ...], batch 1).

Streaming: each response holds only its new tokens (the prompt is never streamed, as in TensorRT-LLM); which
engine outputs go into one response is ``pacing.py``'s call.
Not streaming: one response with every output token, the prompt first unless ``exclude_input_in_output``.
``context_ids`` (ours) carries the tokens shown just before, so postprocessing can detokenise byte-exactly.
Optional outputs appear only when asked for (``return_log_probs``, ``return_perf_metrics``,
``return_num_input_tokens``) or when they say something: ``sequence_index`` with ``num_return_sequences`` > 1
and never ``batch_index`` (a request is one batch row), as TensorRT-LLM's backend sends them; ``num_cached_tokens``
in a sequence's first response, ``finish_reason`` in its last. Every tensor costs each streamed response a trip
through postprocessing and the frontend (docs/benchmarks.md, "Triton's CPU per streamed token"), so constants and
empty values are not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scalellm.engine.sequence import RequestOutput
from scalellm.tokenization import context_tail
from scalellm.triton.pacing import Pacer
from scalellm.triton.request import LLMRequest

PERF_OUTPUTS = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


@dataclass
class SequenceProgress:
    """One returned sequence of a request: what was already sent."""

    index: int  # sequence_index
    shown: list[int]  # the last tokens already shown (detokenisation context)
    pacer: Pacer  # the output not yet sent
    cum_log_prob: float = 0.0
    done: bool = False
    started: bool = False  # a response was sent


def start(request: LLMRequest, index: int, stream_interval: int) -> SequenceProgress:
    shown = [] if request.echoed_prompt else context_tail(request.prompt, [])
    return SequenceProgress(index=index, shown=shown, pacer=Pacer(stream_interval if request.stream else None))


def _i32(value: int) -> np.ndarray:
    return np.asarray([[value]], dtype=np.int32)


def tensors(request: LLMRequest, seq: SequenceProgress, out: RequestOutput,
            block_size: int) -> dict[str, np.ndarray] | None:
    """The response for ``out`` (one engine output, or several merged; not streaming: the whole output), or None
    when there is nothing to send."""
    final = out.finish_reason is not None
    new, new_lp = out.new_token_ids, out.new_log_probs or []
    for lp in new_lp:  # one token at a time: the same sum however the outputs were merged
        seq.cum_log_prob += lp
    if not request.stream:
        if not final:
            return None
        new = request.echoed_prompt + new
    elif not new and not final:
        return None
    context = seq.shown
    seq.shown = context_tail(seq.shown, new)
    seq.done = final
    result = {
        "output_ids": np.asarray([[new]], dtype=np.int32).reshape(1, 1, len(new)),
        "sequence_length": _i32(len(new)),
        "context_ids": np.asarray([[context]], dtype=np.int32).reshape(1, 1, len(context)),
        "num_output_tokens": _i32(out.num_output_tokens),
    }
    if final:
        result["finish_reason"] = np.asarray([[out.finish_reason.encode()]], dtype=object)
    if not seq.started:
        seq.started = True
        result["num_cached_tokens"] = _i32(out.num_cached_tokens)
    if len(request.samples) > 1:
        result["sequence_index"] = _i32(seq.index)
    if request.num_input_tokens:
        result["num_input_tokens"] = _i32(len(request.prompt))
    if out.new_log_probs is not None:
        result["cum_log_probs"] = np.asarray([[seq.cum_log_prob]], dtype=np.float32)
        result["output_log_probs"] = np.asarray(new_lp, dtype=np.float32).reshape(1, 1, -1)
    if request.perf_metrics:
        t = out.timings
        marks = (t.arrival_ns, t.first_scheduled_ns, t.first_token_ns, t.last_token_ns)
        for name, mark in zip(PERF_OUTPUTS, marks, strict=True):
            result[name] = np.asarray([[mark]], dtype=np.int64)
        total = -(-(len(request.prompt) + out.num_output_tokens) // block_size)
        reused = out.num_cached_tokens // block_size
        result |= {"kv_cache_alloc_new_blocks": _i32(total - reused), "kv_cache_reused_blocks": _i32(reused),
                   "kv_cache_alloc_total_blocks": _i32(total), "acceptance_rate": np.zeros((1, 1), np.float32),
                   "total_accepted_draft_tokens": _i32(0), "total_draft_tokens": _i32(0)}
    return result

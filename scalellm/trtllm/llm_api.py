"""Translate the official ``tensorrt_llm`` model's request tensors into the LLM API's ``SamplingParams`` and its
results back into ``output_ids`` / ``sequence_length``: the TensorRT-LLM-free half of the LLM-API model
(``model_repository_gpu/tensorrt_llm_pytorch/1/model.py``), so it is unit-tested without a GPU.

The names on the right are ``tensorrt_llm.SamplingParams`` fields (max_tokens, end_id, pad_id, temperature,
top_k, top_p, seed, repetition_penalty, presence_penalty, frequency_penalty, length_penalty, min_tokens,
stop_token_ids, bad_token_ids, logprobs, ignore_eos).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scalellm.triton.contract import sampling_mode
from scalellm.triton.tensors import InvalidInput, check_range, scalar

# official input name -> SamplingParams field, for the scalar inputs passed through unchanged
PASSTHROUGH = {"temperature": "temperature", "len_penalty": "length_penalty",
               "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
               "pad_id": "pad_id"}


def unflatten_words(array: np.ndarray | None) -> list[list[int]]:
    """The [2, N] word-list format of ``stop_words_list`` / ``bad_words_list`` (row 0: the tokens of all words
    back to back; row 1: each word's end offset, padded with -1) as one token list per word."""
    if array is None:
        return []
    rows = np.asarray(array).reshape(-1, 2, np.asarray(array).shape[-1])[0]
    tokens, offsets = rows[0].tolist(), [int(o) for o in rows[1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if not start <= end <= len(tokens):
            raise InvalidInput(f"word list offsets must rise within the {len(tokens)} tokens (got {offsets})")
        if end > start:
            words.append([int(t) for t in tokens[start:end]])
        start = end
    return words


def sampling_kwargs(inputs: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """SamplingParams keyword arguments for one request (inputs by official name; absent ones are None).

    Multi-token stop/bad words are returned under ``stop_words`` / ``bad_words`` as token lists: the model
    decodes them into the strings SamplingParams takes for sequences (``stop`` / ``bad``).
    """
    max_tokens = scalar(inputs.get("request_output_len"), "max_tokens")
    if max_tokens is None or max_tokens < 1:
        raise InvalidInput(f"max_tokens must be >= 1 (got {max_tokens})")
    beam_width = scalar(inputs.get("beam_width"), "beam_width", 1)
    if beam_width != 1:
        raise InvalidInput(f"beam_width must be 1 on the LLM-API path (got {beam_width})")
    kwargs: dict[str, Any] = {"max_tokens": int(max_tokens)}
    for name, field in PASSTHROUGH.items():
        value = scalar(inputs.get(name), name)
        if value is not None:
            kwargs[field] = value
    top_k = int(scalar(inputs.get("runtime_top_k"), "top_k", 0))
    check_range("top_k", top_k, low=0)
    top_p = float(scalar(inputs.get("runtime_top_p"), "top_p", 0.0))
    check_range("top_p", top_p, 0.0, 1.0)
    top_k, top_p = sampling_mode(top_k, top_p)  # the official model's rule, stated to the LLM API explicitly
    if top_k:
        kwargs["top_k"] = top_k
    if top_k != 1:
        kwargs["top_p"] = top_p
    end_id = scalar(inputs.get("end_id"), "end_id")
    if end_id == -1:
        kwargs["ignore_eos"] = True  # -1: no end token, generate exactly max_tokens
    elif end_id is not None:
        kwargs["end_id"] = int(end_id)
    if scalar(inputs.get("return_log_probs"), "return_log_probs", False):
        kwargs["logprobs"] = 1  # the sampled token's log-probability
    for name, ids_field, words_field in (("stop_words_list", "stop_token_ids", "stop_words"),
                                         ("bad_words_list", "bad_token_ids", "bad_words")):
        words = unflatten_words(inputs.get(name))
        singles = [w[0] for w in words if len(w) == 1]
        if singles:
            kwargs[ids_field] = singles
        if len(singles) < len(words):
            kwargs[words_field] = [w for w in words if len(w) > 1]
    return kwargs


PERF_MARKS = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


def output_arrays(token_ids: list[int], log_probs: list[float] | None, cum_log_prob: float | None,
                  marks: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The official outputs for one response of one request: [batch=1, beam=1, tokens] ids and [1, 1] length.

    Log-probs come back only when asked for: empty otherwise (never zeros that look like probabilities).
    ``marks`` (with return_perf_metrics): wall-clock ns as this model saw the request: received, handed to the
    LLM, first and latest tokens back; all 0 when not asked for, as our CPU engine does."""
    ids = np.asarray(token_ids, dtype=np.int32).reshape(1, 1, -1)
    logs = np.asarray(log_probs if log_probs is not None else [], dtype=np.float32).reshape(1, 1, -1)
    cum = np.asarray([] if cum_log_prob is None else [cum_log_prob], dtype=np.float32).reshape(1, -1)
    arrays = {"output_ids": ids, "sequence_length": np.asarray([[len(token_ids)]], dtype=np.int32),
              "output_log_probs": logs, "cum_log_probs": cum}
    for name in PERF_MARKS:
        arrays[name] = np.asarray([[(marks or {}).get(name, 0)]], dtype=np.int64)
    return arrays


def token_log_probs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The sampled tokens' log-probabilities from a CompletionOutput's ``logprobs`` (a float per token, or a
    {token_id: Logprob} dict per token, depending on the TensorRT-LLM version)."""
    values = []
    for entry, token in zip(logprobs or [], token_ids, strict=False):
        if isinstance(entry, dict):
            chosen = entry.get(token, next(iter(entry.values()), None))
            values.append(float(getattr(chosen, "logprob", chosen)))
        else:
            values.append(float(entry))
    return values

"""The LLM-API model's TensorRT-LLM-free half (``model_repository_gpu/tensorrt_llm_pytorch/1/model.py``), so it is
unit-tested without a GPU: the engine bounds its requests are parsed against, one parsed sample as
``tensorrt_llm.SamplingParams`` keyword arguments, and its results back as the official outputs.

Requests are parsed by the llm model's own parser (``scalellm/triton/request.py``): the same defaults (the contract
table), bounds and messages, whichever model serves the ensemble. The names on the right are
``tensorrt_llm.SamplingParams`` fields (max_tokens, end_id, ignore_eos, temperature, top_k, top_p, seed, min_p,
repetition_penalty, presence_penalty, frequency_penalty, min_tokens, stop_token_ids, bad_token_ids, logprobs);
one it is not given takes TensorRT-LLM's runtime default, which is also ours.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from scalellm.config import hf_eos_token_ids, read_hf_config
from scalellm.engine.admission import exceeds_context
from scalellm.engine.sequence import SamplingParams
from scalellm.triton.request import EngineLimits

TOKENS_PER_BLOCK = 32  # TensorRT-LLM's KV-cache block default; only our llm model's kv_cache_* outputs use it
_UNSET = SamplingParams()
# SamplingParams fields of the same name and meaning on both sides, passed on when not at their default
SAME_FIELDS = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens")


def engine_limits(llm_args: dict[str, Any], decoupled: bool) -> EngineLimits:
    """What the parser checks requests against: the checkpoint's vocabulary and end tokens (its config.json)
    and model.yaml's ``max_seq_len`` (prompt + output tokens)."""
    hf = read_hf_config(llm_args["model"])
    max_seq_len = int(llm_args["max_seq_len"])
    return EngineLimits(vocab_size=int(hf["vocab_size"]), eos_token_ids=hf_eos_token_ids(hf),
                        check_fits=partial(exceeds_context, max_model_len=max_seq_len), max_model_len=max_seq_len,
                        block_size=TOKENS_PER_BLOCK, decoupled=decoupled)


def sampling_kwargs(sample: SamplingParams, eos_token_ids: tuple[int, ...]) -> dict[str, Any]:
    """SamplingParams keyword arguments for one parsed sample.

    Greedy (temperature 0 or top_k 1, ``contract.sampling_mode``) is top_k 1 alone. End tokens: the model's own
    (no end_id given) are left to the LLM API, none (end_id -1) is ``ignore_eos``. Stop/bad sequences of one token
    go by id; longer ones come back under ``stop_words`` / ``bad_words`` as token lists: the model decodes them
    into the strings SamplingParams takes for sequences (``stop`` / ``bad``).
    """
    kwargs: dict[str, Any] = {"max_tokens": sample.max_tokens}
    if sample.greedy:
        kwargs["top_k"] = 1
    else:
        kwargs |= {"temperature": sample.temperature, "top_p": sample.top_p, "seed": sample.seed}
        if sample.top_k:
            kwargs["top_k"] = sample.top_k
    kwargs |= {name: getattr(sample, name) for name in SAME_FIELDS if getattr(sample, name) != getattr(_UNSET, name)}
    if not sample.stop_token_ids:
        kwargs["ignore_eos"] = True
    elif sample.stop_token_ids != tuple(eos_token_ids):
        kwargs["end_id"] = sample.stop_token_ids[0]
    if sample.return_log_probs:
        kwargs["logprobs"] = 1  # the sampled token's log-probability
    for sequences, ids_field, words_field in ((sample.stop_sequences, "stop_token_ids", "stop_words"),
                                              (sample.bad_sequences, "bad_token_ids", "bad_words")):
        singles = [seq[0] for seq in sequences if len(seq) == 1]
        if singles:
            kwargs[ids_field] = singles
        if len(singles) < len(sequences):
            kwargs[words_field] = [list(seq) for seq in sequences if len(seq) > 1]
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

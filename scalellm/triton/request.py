"""``llm`` inputs -> what the engine runs: the prompt and one :class:`SamplingParams` per returned sequence.

Every bound is checked here, against the contract's defaults (``contract.py``) and the engine's limits,
with a message naming the ensemble field (and the llm input when it is named differently).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scalellm.engine.deadlines import MAX_TIMEOUT_MS
from scalellm.engine.sequence import SamplingParams
from scalellm.tokenization import unflatten_word_ids
from scalellm.triton.contract import LLM_FIELDS, Field, sampling_mode
from scalellm.triton.tensors import Get, InvalidInput, check_range, check_refused, scalar

CASTS = {"FP32": float, "INT32": int, "UINT64": int, "BOOL": bool}


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    check_fits: Callable[[int, int], str | None]  # LLMEngine.check_fits: why (prompt, max_tokens) can never run
    max_model_len: int
    block_size: int  # KV-cache block size, for the kv_cache_* perf outputs
    decoupled: bool  # the model's transaction policy: several responses per request allowed


@dataclass(frozen=True)
class LLMRequest:
    prompt: list[int]
    samples: list[SamplingParams]  # one per returned sequence
    stream: bool
    exclude_input: bool
    perf_metrics: bool
    num_input_tokens: bool
    timeout_ms: int = 0  # 0: the llm's default_timeout_ms
    stream_interval: int | None = None  # None: the llm's stream_interval parameter

    @property
    def echoed_prompt(self) -> list[int]:
        """The prompt tokens a response starts with (TensorRT-LLM's rule): a whole, non-streamed response's,
        unless exclude_input_in_output; a stream never repeats the prompt."""
        return [] if self.stream or self.exclude_input else self.prompt


def _words(get: Get, name: str) -> tuple[tuple[int, ...], ...]:
    tensor = get(name)
    if tensor is None or tensor.size == 0:
        return ()
    tensor = np.asarray(tensor)
    if tensor.ndim < 2 or tensor.shape[-2] != 2 or tensor.size != 2 * tensor.shape[-1]:
        raise InvalidInput(f"{name} must have shape [2, N] (token ids, end offsets; got {list(tensor.shape)})")
    ids, offsets = tensor.reshape(2, -1).tolist()
    try:
        return tuple(unflatten_word_ids(ids, offsets))
    except ValueError as exc:
        raise InvalidInput(f"{name}: {exc}") from None


def _checked(f: Field, value: object) -> object:
    """A plain field's value as its SamplingParams type, within the contract's bounds."""
    value = CASTS[f.dtype](value)
    if f.dtype != "BOOL":
        check_range(f.name, value, low=f.low, high=f.high, low_open=f.low_open)
    return value


def parse(get: Get, limits: EngineLimits) -> LLMRequest:
    def value(name: str):
        f = LLM_FIELDS[name]
        return scalar(get(name), f.name, f.default)

    check_refused(get, LLM_FIELDS.values())
    ids = get("input_ids")
    if ids is None:
        raise InvalidInput("input_ids is required (unless cancel_request_id or stop is given)")
    prompt = np.asarray(ids).reshape(-1).tolist()
    if not prompt:
        raise InvalidInput("input_ids must not be empty")
    if not all(0 <= t < limits.vocab_size for t in prompt):
        raise InvalidInput(f"input_ids must be in [0, {limits.vocab_size})")
    input_length = scalar(get("input_lengths"), "input_lengths")
    if input_length is not None and input_length != len(prompt):
        raise InvalidInput(f"input_lengths ({input_length}) must equal the length of input_ids ({len(prompt)})")

    max_tokens = int(value("request_output_len"))
    check_range("max_tokens", max_tokens, low=1)
    problem = limits.check_fits(len(prompt), max_tokens)
    if problem:
        raise InvalidInput(f"{'text_input' if len(prompt) >= limits.max_model_len else 'max_tokens'}: {problem}")

    beam_width = int(value("beam_width"))
    if beam_width != 1:
        raise InvalidInput(f"beam_width must be 1 (beam search is not implemented; got {beam_width})")
    n = int(value("num_return_sequences"))
    check_range("num_return_sequences", n, low=1, high=64)
    stream = bool(value("streaming"))
    if not limits.decoupled and (stream or n > 1):
        what = "stream" if stream else f"num_return_sequences {n}"
        raise InvalidInput(f"{what} needs the decoupled deployment (build_engines.py --decoupled-mode true); "
                           "this one answers each request with exactly one response")

    top_k = int(value("runtime_top_k"))
    check_range("top_k", top_k, low=0, high=limits.vocab_size)
    top_p = float(value("runtime_top_p"))
    check_range("top_p", top_p, low=0.0, high=1.0)
    top_k, top_p = sampling_mode(top_k, top_p)
    plain = {f.param: _checked(f, value(name)) for name, f in LLM_FIELDS.items() if f.param}
    temperature = float(value("temperature"))
    check_range("temperature", temperature, low=0.0)
    check_range("length_penalty", float(value("len_penalty")))  # beam search only: no effect here
    min_tokens = value("min_tokens")
    min_tokens = int(value("min_length") if min_tokens is None else min_tokens)
    check_range("min_tokens", min_tokens, low=0, high=max_tokens)
    seed = value("seed")
    seed = value("random_seed") if seed is None else seed
    seed = random.getrandbits(63) if seed is None else int(seed) % (1 << 63)
    end_id = value("end_id")
    if end_id is None:
        stop_ids = limits.eos_token_ids
    else:
        check_range("end_id", end_id, low=-1, high=limits.vocab_size - 1)
        stop_ids = (end_id,) if end_id >= 0 else ()
    base = dict(
        plain, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_tokens=min_tokens,
        stop_token_ids=tuple(stop_ids), stop_sequences=_words(get, "stop_words_list"),
        bad_sequences=_words(get, "bad_words_list"),
    )
    timeout_ms = int(value("timeout_ms") or 0)
    check_range("timeout_ms", timeout_ms, low=0, high=MAX_TIMEOUT_MS)
    interval = value("stream_interval")
    if interval is not None:
        interval = int(interval)
        check_range("stream_interval", interval, low=LLM_FIELDS["stream_interval"].low)
    samples = [SamplingParams(seed=(seed + i) % (1 << 63), **base) for i in range(n)]
    return LLMRequest(
        prompt=prompt,
        samples=samples,
        stream=stream,
        exclude_input=bool(value("exclude_input_in_output")),
        perf_metrics=bool(value("return_perf_metrics")),
        num_input_tokens=bool(value("return_num_input_tokens")),
        timeout_ms=timeout_ms,
        stream_interval=interval,
    )

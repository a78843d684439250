"""A request inside the engine: its tokens, sampling parameters, cache blocks and progress."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from scalellm.config import DEFAULT_MAX_TOKENS


@dataclass
class SamplingParams:
    """Per-request decoding controls (the ensemble's sampling inputs, validated)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    seed: int = 0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # end of sequence ids
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token sequences that end generation (not output)
    bad_sequences: tuple[tuple[int, ...], ...] = ()  # token sequences never generated
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    return_log_probs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestTimings:
    """Wall-clock (time.time_ns) marks, comparable across processes on one machine; 0 = not yet."""

    arrival_ns: int = 0
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0


@dataclass
class RequestOutput:
    """What the engine reports after a step that changed a request: only what is new since the last report."""

    request_id: str
    new_token_ids: list[int]  # output tokens not reported before (stop-sequence tails held back)
    num_output_tokens: int  # output tokens reported so far, these included
    finish_reason: str | None  # None while running; "stop" | "length" | "cancelled" | "error"
    new_log_probs: list[float] | None = None  # log-probs of new_token_ids (with return_log_probs)
    num_cached_tokens: int = 0  # prefix-cache hits
    timings: RequestTimings = field(default_factory=RequestTimings)
    error: str | None = None


@dataclass
class FinishedRequest:
    """A whole finished request (``LLMEngine.generate``)."""

    token_ids: list[int]  # prompt + output
    num_output_tokens: int
    finish_reason: str
    log_probs: list[float] | None = None
    num_cached_tokens: int = 0


@dataclass(eq=False)  # a request in flight is itself, not its fields: `in` and `remove` on the scheduler's lists
class Sequence:  # compare identities (field-wise equality cost ~2000 comparisons of token lists a step at 64)
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    output_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix-cache keys of the full blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_reported: int = 0  # output tokens already handed to on_output
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)  # FCFS order, preemption victims
    arrival_ns: int = field(default_factory=time.time_ns)
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    def held_back(self) -> int:
        """Output tokens not yet safe to emit: a tail that could still grow into a stop sequence."""
        out, best = self.output_ids, 0
        for stop in self.params.stop_sequences:
            for k in range(min(len(stop) - 1, len(out)), best, -1):
                if tuple(out[-k:]) == stop[:k]:
                    best = k
                    break
        return best

"""Streaming pace (scalellm/triton/pacing.py): a response per token while the responses keep up, the pending
tokens as one response when they fall behind, and ``stream_interval``.

First the rule alone, then the ``llm`` model's EngineHost on the real engine in process: an engine step that
waits for the responses the rule says are due (the sender keeps up), or a responder that holds the sender back
until the engine has finished (the sender is behind). Nothing depends on timing: each wait is for a condition,
with a timeout only to fail instead of hanging. Over real sockets, the session server: the streamed text equals
the non-streamed text at every ``stream_interval`` and never has more responses than the rule allows.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ENGINE_DIR, require_engine

from scalellm.config import CacheConfig, EngineConfig, StreamConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import RequestOutput
from scalellm.models.engine_meta import EngineMeta
from scalellm.triton.host import EngineHost
from scalellm.triton.pacing import Pacer, merge
from scalellm_client import Client, chatml

PROMPT = [1, 9690, 314, 253, 1345, 30]  # any ids: the engine neither knows nor cares what text they were
WAIT_S = 120.0  # a condition not met by then fails the test (a loaded 2-core machine is slow, never this slow)
SERVER_DEFAULT = 2  # the host below is built with this stream_interval


def rule_count(tokens: int, interval: int) -> int:
    """Responses for ``tokens`` tokens at ``stream_interval`` while the sender keeps up: the first token, then a
    response every ``interval`` tokens, the rest with the last."""
    return 1 + math.ceil((tokens - 1) / interval)


def output(tokens: list[int], total: int, final: bool = False) -> RequestOutput:
    return RequestOutput("r", list(tokens), total, "length" if final else None,
                         new_log_probs=[-0.25 * t for t in tokens])


def engine_outputs(n: int) -> list[RequestOutput]:
    """What the engine reports for n tokens, one a step (the tokens are 1..n)."""
    return [output([t], t, final=t == n) for t in range(1, n + 1)]


def keep_up(pacer: Pacer, outs: list[RequestOutput]) -> list[RequestOutput]:
    """The responses when the sender takes each output alone, as the llm's sender does."""
    sent = []
    for out in outs:
        if pacer.add(out) or pacer.due():
            sent.append(pacer.take())
    return sent


# ---- the rule -----------------------------------------------------------------------------------------------

def test_merging_keeps_every_token_and_log_prob_in_order() -> None:
    outs = engine_outputs(4)
    merged = None
    for out in outs:
        merged = merge(merged, out)
    assert merged.new_token_ids == [1, 2, 3, 4]
    assert merged.new_log_probs == [-0.25, -0.5, -0.75, -1.0]
    assert (merged.num_output_tokens, merged.finish_reason) == (4, "length")  # the latest output's state
    assert outs[0].new_token_ids == [1] and outs[0].new_log_probs == [-0.25]  # the engine's outputs untouched


@pytest.mark.parametrize("interval", [1, 2, 3, 5, 50])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 12])
def test_keeping_up_sends_the_first_token_then_every_interval_then_the_last(interval: int, n: int) -> None:
    sent = keep_up(Pacer(interval), engine_outputs(n))
    assert len(sent) == rule_count(n, interval)
    assert [t for out in sent for t in out.new_token_ids] == list(range(1, n + 1))
    assert sent[0].new_token_ids == [1]
    assert all(len(out.new_token_ids) == interval for out in sent[1:-1])
    assert [out.finish_reason for out in sent] == [None] * (len(sent) - 1) + ["length"]


def test_outputs_waiting_together_become_one_response_but_the_first_token_goes_alone() -> None:
    pacer, outs = Pacer(1), engine_outputs(6)
    assert pacer.add(outs[0])  # the first token: out at once, even with more waiting behind it
    first = pacer.take()
    for out in outs[1:4]:  # three outputs the sender takes together
        assert not pacer.add(out)
    assert pacer.due()
    merged = pacer.take()
    assert (first.new_token_ids, merged.new_token_ids, merged.num_output_tokens) == ([1], [2, 3, 4], 4)
    assert merged.new_log_probs == [-0.5, -0.75, -1.0]
    assert not pacer.add(outs[4]) and pacer.add(outs[5])  # the last output: out at once
    assert pacer.take().new_token_ids == [5, 6]


def test_a_stream_interval_holds_tokens_until_it_is_reached_and_the_last_flushes_them() -> None:
    pacer, outs = Pacer(4), engine_outputs(7)
    assert pacer.add(outs[0]) and pacer.take().new_token_ids == [1]
    for out in outs[1:4]:
        assert not pacer.add(out) and not pacer.due()
    assert not pacer.add(outs[4]) and pacer.due()
    assert pacer.take().new_token_ids == [2, 3, 4, 5]
    assert not pacer.add(outs[5]) and pacer.add(outs[6])
    assert pacer.take().new_token_ids == [6, 7]


def test_a_request_not_streamed_gets_one_response_with_everything() -> None:
    pacer = Pacer(None)
    for out in engine_outputs(5)[:-1]:
        assert not pacer.add(out) and not pacer.due()
    assert pacer.add(engine_outputs(5)[-1])
    whole = pacer.take()
    assert whole.new_token_ids == [1, 2, 3, 4, 5] and len(whole.new_log_probs) == 5


def test_an_output_without_tokens_is_not_a_first_response() -> None:
    """A step whose token may start a stop word reports nothing new; the first response waits for a token."""
    pacer = Pacer(1)
    assert not pacer.add(output([], 0)) and not pacer.due()
    assert pacer.add(output([7], 1)) and pacer.take().new_token_ids == [7]


# ---- the llm's host on the real engine ----------------------------------------------------------------------

class Recorder:
    """A Responder that records responses; ``hold_first``: its first send waits until ``release`` is set."""

    def __init__(self, hold_first: bool = False) -> None:
        self.responses: list[dict[str, np.ndarray]] = []
        self.errors: list[str] = []
        self.hold_first = hold_first
        self.release = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()

    def send(self, tensors, error=None, final=False, invalid=False, unavailable=False) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(error)
            else:
                self.responses.append(tensors)
        if self.hold_first and len(self.responses) == 1 and not final:
            self.release.wait(WAIT_S)
        if final:
            self.done.set()

    def is_cancelled(self) -> bool:
        return False

    def tokens(self) -> list[list[int]]:
        with self.lock:
            return [r["output_ids"].reshape(-1).tolist() for r in self.responses]

    def finished(self) -> list[dict[str, np.ndarray]]:
        assert self.done.wait(WAIT_S), f"the request never finished: responses so far {self.tokens()}"
        assert not self.errors, self.errors
        return self.responses


class Steps:
    """The engine's ``on_step``: counts generated tokens; ``gate`` (optional) is waited for after each step."""

    def __init__(self) -> None:
        self.generated = 0
        self.gate = None
        self.stuck: list[str] = []
        self.all_generated = threading.Event()
        self.expected = 0

    def __call__(self, stats) -> None:
        self.generated += stats.generated_tokens
        if self.expected and self.generated >= self.expected:
            self.all_generated.set()
        gate, generated = self.gate, self.generated  # this request's, even once the test has moved on
        if gate is not None and stats.generated_tokens:
            deadline = time.monotonic() + WAIT_S
            while not gate(generated):
                if time.monotonic() > deadline:
                    self.stuck.append(f"after {generated} tokens")
                    return
                time.sleep(0.002)


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[EngineHost, Steps]]:
    require_engine()
    engine = LLMEngine(EngineConfig(engine_dir=str(ENGINE_DIR), dtype=EngineMeta.read(ENGINE_DIR).dtype or "auto",
                                    cache=CacheConfig(num_blocks=64)))
    steps = Steps()
    engine.on_step = steps
    host = EngineHost(engine, decoupled=True, stream=StreamConfig(stream_interval=SERVER_DEFAULT))
    host.start()
    yield host, steps
    host.stop()


def run(host: EngineHost, steps: Steps, recorder: Recorder, n: int, **fields: object) -> None:
    values = {"input_ids": PROMPT, "request_output_len": n, "end_id": -1, "streaming": True,
              "return_log_probs": True, **fields}
    arrays = {name: np.asarray(value).reshape(1, -1) for name, value in values.items()}
    steps.generated, steps.expected = 0, n
    steps.all_generated.clear()
    host.handle(arrays.get, f"pacing-{id(recorder)}", recorder)


@pytest.mark.parametrize("interval", [1, 4, None])  # None: the server default (SERVER_DEFAULT)
def test_a_sender_that_keeps_up_sends_exactly_what_the_rule_says(host, interval: int | None) -> None:
    engine_host, steps = host
    n, k = 10, interval or SERVER_DEFAULT
    recorder = Recorder()

    def sent_by_rule(generated: int) -> bool:  # the engine waits for the responses the rule makes due
        due = generated if generated == n else 1 + (generated - 1) // k * k
        return sum(map(len, recorder.tokens())) == due

    steps.gate = sent_by_rule
    try:
        run(engine_host, steps, recorder, n, **({} if interval is None else {"stream_interval": interval}))
        responses = recorder.finished()
    finally:
        steps.gate = None
    assert not steps.stuck, f"the responses fell short of the rule {steps.stuck}: {recorder.tokens()}"
    sizes = [len(t) for t in recorder.tokens()]
    assert sizes == [1] + [k] * ((n - 1) // k) + ([(n - 1) % k] if (n - 1) % k else []), sizes
    assert len(responses) == rule_count(n, k)
    counts = [int(r["num_output_tokens"].item()) for r in responses]
    assert counts == list(np.cumsum(sizes))


def test_a_sender_that_falls_behind_sends_the_pending_tokens_as_one_response(host) -> None:
    engine_host, steps = host
    n = 12
    reference = Recorder()  # the same request, not streamed: its log-probs
    run(engine_host, steps, reference, n, streaming=False, stream_interval=1)
    (whole,) = reference.finished()
    recorder = Recorder(hold_first=True)  # the first response is stuck in IPC while the engine runs on
    run(engine_host, steps, recorder, n, stream_interval=1)
    assert steps.all_generated.wait(WAIT_S), "the engine never finished the request"
    recorder.release.set()
    first, merged = recorder.finished()
    whole_ids = whole["output_ids"].reshape(-1).tolist()[len(PROMPT):]
    assert recorder.tokens() == [whole_ids[:1], whole_ids[1:]]
    assert merged["finish_reason"].item() == b"length"
    assert (int(first["num_output_tokens"].item()), int(merged["num_output_tokens"].item())) == (1, n)
    log_probs = whole["output_log_probs"].reshape(-1).tolist()
    assert first["output_log_probs"].reshape(-1).tolist() == pytest.approx(log_probs[:1], abs=1e-4)
    assert merged["output_log_probs"].reshape(-1).tolist() == pytest.approx(log_probs[1:], abs=1e-4)
    assert merged["cum_log_probs"].item() == pytest.approx(whole["cum_log_probs"].item(), abs=1e-3)
    assert merged["cum_log_probs"].item() == pytest.approx(sum(log_probs), abs=1e-3)


# ---- over real sockets --------------------------------------------------------------------------------------

# Greedy answers with CJK, emoji and accents (as tests/test_server_e2e.py's): end_id 0, an end token SmolLM2's
# chat answers never produce, runs each to max_tokens, so the rule's count is known.
WIDE_PROMPTS = [chatml("Repeat exactly: 🎉🚀👍 🎉🚀👍"), chatml("Translate into Chinese: Good morning, how are you?")]
TOKENS = 24


@pytest.mark.server
@pytest.mark.parametrize("interval", [3, TOKENS])
def test_streamed_text_is_the_whole_text_at_any_stream_interval(client: Client, interval: int) -> None:
    texts = []
    for prompt in WIDE_PROMPTS:
        whole = client.generate(prompt, max_tokens=TOKENS, end_id=0)
        chunks = list(client.stream_chunks(prompt, max_tokens=TOKENS, end_id=0, stream_interval=interval))
        streamed = "".join(c.text for c in chunks)
        assert streamed.encode() == whole.text.encode(), f"streamed {streamed!r} != {whole.text!r}"
        assert (chunks[-1].finish_reason, chunks[-1].num_tokens) == ("length", TOKENS)
        assert [c.num_tokens for c in chunks[:1]] == [1]  # the first token at once, alone
        # At most the rule's count (fewer only when the responses fell behind); the first and the last always.
        assert 2 <= len(chunks) <= rule_count(TOKENS, interval), [c.num_tokens for c in chunks]
        if interval >= TOKENS - 1:
            assert len(chunks) == 2
        texts.append(whole.text)
    assert any(len(ch.encode()) >= 3 for text in texts for ch in text), f"no multi-byte character: {texts!r}"


@pytest.mark.server
def test_a_slow_reader_gets_the_whole_text_in_no_more_responses_than_tokens(grpc_client: Client) -> None:
    prompt = WIDE_PROMPTS[0]
    whole = grpc_client.generate(prompt, max_tokens=TOKENS, end_id=0)
    chunks = []
    for chunk in grpc_client.stream_chunks(prompt, max_tokens=TOKENS, end_id=0):
        chunks.append(chunk)
        time.sleep(0.05)  # reads slower than the engine writes: the responses queue up behind it
    assert "".join(c.text for c in chunks).encode() == whole.text.encode()
    assert len(chunks) <= TOKENS and chunks[-1].num_tokens == TOKENS
    counts = [c.num_tokens for c in chunks]
    assert counts == sorted(set(counts)), counts  # every response carries at least one new token

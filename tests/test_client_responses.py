"""The client's response readers (pure: no server): every output shape servers send, several sequences,
SSE framing, and that synchronous users never load aiohttp."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from scalellm_client import ScaleLLMError
from scalellm_client._response import SSEParser, count_finished, error_message, to_chunk, to_completion


def grpc_outputs(text: str, shape: tuple[int, ...], **extra: object) -> dict[str, np.ndarray]:
    """A response as tritonclient hands it over: numpy arrays, text as bytes."""
    outputs = {"text_output": np.array([text.encode()], dtype=np.object_).reshape(shape),
               "finish_reason": np.array([b"stop"], dtype=np.object_).reshape(shape),
               "num_output_tokens": np.array([7], dtype=np.int32).reshape(shape)}
    outputs.update({name: np.asarray(value) for name, value in extra.items()})
    return outputs


@pytest.mark.parametrize("shape", [(1, 1), (1,)], ids=["[1,1] (older builds)", "[1] (NVIDIA's 1-D)"])
def test_text_output_in_either_shape(shape: tuple[int, ...]) -> None:
    completion = to_completion([grpc_outputs("Paris.", shape)])
    assert (completion.text, completion.finish_reason, completion.num_tokens) == ("Paris.", "stop", 7)
    assert completion.texts == ["Paris."] and completion.choices[0].index == 0
    chunk = to_chunk(grpc_outputs("Par", shape))
    assert (chunk.text, chunk.num_tokens, chunk.index) == ("Par", 7, 0)


def test_http_json_outputs() -> None:
    event = {"model_name": "ensemble", "text_output": "Paris.", "finish_reason": "stop", "num_output_tokens": 3,
             "num_cached_tokens": 2, "cum_log_probs": -1.5, "output_log_probs": [-1.0, -0.25, -0.25]}
    completion = to_completion([event])
    assert (completion.text, completion.num_tokens, completion.num_cached_tokens) == ("Paris.", 3, 2)
    assert completion.cum_log_prob == -1.5 and completion.log_probs == [-1.0, -0.25, -0.25]
    assert completion.timings is None and completion.num_input_tokens is None


def test_sequences_in_separate_responses_are_ordered_by_sequence_index() -> None:
    """A decoupled model answers num_return_sequences=3 with one response per sequence, in any order."""
    responses = [grpc_outputs(f"answer {i}", (1,), sequence_index=np.array([i]), batch_index=np.array([0]),
                              num_input_tokens=np.array([5])) for i in (2, 0, 1)]
    completion = to_completion(responses, sequences=3)
    assert completion.texts == ["answer 0", "answer 1", "answer 2"]
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert completion.num_input_tokens == 5
    assert to_chunk(responses[0]).index == 2


def test_sequences_in_one_response() -> None:
    """A non-decoupled model answers with one response holding every sequence (JSON lists over HTTP)."""
    event = {"text_output": ["a", "b"], "finish_reason": ["stop", "length"], "num_output_tokens": [1, 4],
             "cum_log_probs": [-0.5, -2.0], "output_log_probs": [[-0.5, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, -0.5]]}
    completion = to_completion([event], sequences=2)
    assert [(c.text, c.finish_reason, c.num_tokens, c.cum_log_prob) for c in completion.choices] == [
        ("a", "stop", 1, -0.5), ("b", "length", 4, -2.0)]
    assert completion.choices[1].log_probs == [-0.5, -0.5, -0.5, -0.5]
    assert count_finished(event) == 2


def test_a_missing_sequence_is_an_error_not_a_shorter_list() -> None:
    with pytest.raises(ScaleLLMError, match="expected 2 sequence"):
        to_completion([grpc_outputs("only one", (1,))], sequences=2)
    with pytest.raises(ScaleLLMError, match="expected 1 sequence"):
        to_completion([], sequences=1)


def test_timings_only_when_the_server_sent_them() -> None:
    marks = {"arrival_time_ns": 1, "first_scheduled_time_ns": 2, "first_token_time_ns": 3, "last_token_time_ns": 4}
    assert to_completion([{"text_output": "x", **marks}]).timings == marks
    zeros = {name: 0 for name in marks}
    assert to_completion([{"text_output": "x", **zeros}]).timings is None


def test_count_finished_ignores_streaming_deltas() -> None:
    assert count_finished({"text_output": "a", "finish_reason": ""}) == 0
    assert count_finished({"text_output": "a"}) == 0
    assert count_finished(grpc_outputs("a", (1, 1))) == 1


def test_sse_events_are_framed_by_blank_lines_and_end_of_stream() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"text_output": "a"}\n') == []
    assert parser.feed(b"\n") == [{"text_output": "a"}]
    assert parser.feed(b": a comment\n") == []
    assert parser.feed(b"\r\n") == []  # nothing pending
    assert parser.feed(b'data:{"text_output": "b"}') == []
    assert parser.feed(b"") == [{"text_output": "b"}]  # end of stream ends the last event


def test_an_error_event_raises_the_servers_message() -> None:
    parser = SSEParser()
    parser.feed(b'data: {"error": "max_tokens must be >= 1 (got 0)"}\n')
    with pytest.raises(ScaleLLMError, match="max_tokens must be >= 1"):
        parser.feed(b"\n")
    assert error_message(b'data: {"error": "top_p must be <= 1"}\n\n') == "top_p must be <= 1"
    assert error_message(b"plain text") == "plain text"


def test_synchronous_users_never_load_aiohttp() -> None:
    code = ("import sys; from scalellm_client import Client, Completion; Client('127.0.0.1:1', protocol='http'); "
            "Client('127.0.0.1:1'); assert 'aiohttp' not in sys.modules, 'aiohttp loaded'; "
            "from scalellm_client import AsyncClient; AsyncClient('127.0.0.1:1'); "
            "assert 'aiohttp' not in sys.modules, 'aiohttp loaded by the gRPC AsyncClient'; "
            "AsyncClient('127.0.0.1:1', protocol='http'); assert 'aiohttp' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

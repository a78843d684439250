"""Synchronous client for the ScaleLLM ensemble over gRPC or HTTP.

    with Client() as llm:
        print(llm.generate("What is the capital of France?", chat=True, max_tokens=32).text)
        for delta in llm.stream("Tell me a story", chat=True, temperature=0.8):
            print(delta, end="", flush=True)

A Client may be shared between threads: every call has its own gRPC stream (pooled gRPC clients)
or HTTP connection (pooled keep-alive connections).
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from typing import Any

from ._request import build_request, for_model, normalize_url, num_sequences, one_sequence
from ._response import to_chunk, to_completion
from ._types import Completion, StreamChunk
from .grpc import GrpcTransport
from .http import HttpTransport


class ClientBase:
    """Talks to Triton's ``model`` (default: the ensemble) at ``url``; ``Client`` and ``AsyncClient``
    take the same arguments and sampling keywords.

    - ``url``: host:port, with or without ``http://``; default 127.0.0.1:8001 (gRPC) or 127.0.0.1:8000 (HTTP).
    - ``protocol``: "grpc" or "http".
    - ``model``: the model to call. Whether it is decoupled (streams) is read from its configuration
      on the first call: a decoupled model is called over the streaming API, one that is not with
      plain infer (``stream`` then raises ScaleLLMError).
    - ``timeout_s``: bounds each whole call, a stream included; None waits forever.
    - ``cancel_model``: the step that stops an abandoned request by id (the ensemble's ``llm``; see
      ``_request``'s docstring for why).

    Sampling keywords (all optional; only those set are sent, the server's defaults apply to the rest):
    max_tokens (default: the server's), chat (apply the model's chat template to the prompt), temperature, top_k
    (0: off), top_p (0: off), min_p, seed, stop (str or list of str), bad_words, num_return_sequences (the
    completions are in ``Completion.choices``), exclude_input_in_output, return_log_probs,
    return_perf_metrics, return_num_input_tokens, return_num_output_tokens, repetition_penalty,
    presence_penalty, frequency_penalty, min_tokens, end_id (-1: no end token), pad_id, beam_width,
    length_penalty, stream_interval (streaming: a response every this many tokens after the first; default:
    the server's, 1). The server decodes greedily unless top_k or top_p asks for sampling (TensorRT-LLM's
    rule); temperature > 0 or min_p > 0 without either also sends top_p=1.0, so that they sample.
    Server-side failures raise ScaleLLMError with the server's message.
    """

    transports: dict[str, type]

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout_s: float | None = None, cancel_model: str = "llm") -> None:
        self.url = normalize_url(url, protocol)
        self.protocol = protocol
        self.model = model
        self._transport = self.transports[protocol](self.url, model, timeout_s, cancel_model)


class Client(ClientBase):
    __doc__ = ClientBase.__doc__
    transports = {"grpc": GrpcTransport, "http": HttpTransport}

    def generate(self, prompt: str, **sampling: Any) -> Completion:
        """The whole completion (``stream=false``); several sequences are in ``.choices``."""
        fields = build_request(prompt, stream=False, **sampling)
        info = self._transport.model_info()
        responses = self._transport.generate(for_model(fields, self.model, info), info.decoupled)
        return to_completion(responses, num_sequences(fields))

    def stream_chunks(self, prompt: str, **sampling: Any) -> Generator[StreamChunk, None, None]:
        """Every streamed response, empty deltas included (for timing tokens).

        Arguments are checked now; the request is sent on the first ``next()``. Closing the
        generator early (``break``, ``.close()``), an error or a timeout cancels the request.
        """
        return self._chunks(build_request(prompt, stream=True, **sampling))

    def stream(self, prompt: str, **sampling: Any) -> Generator[str, None, None]:
        """The text as it is generated, as non-empty deltas that concatenate to the full text."""
        one_sequence(sampling)
        return self._deltas(self.stream_chunks(prompt, **sampling))

    def _chunks(self, fields: dict[str, Any]) -> Generator[StreamChunk, None, None]:
        responses = self._transport.stream(for_model(fields, self.model, self._transport.model_info()))
        with closing(responses):  # closing the chunks closes (so cancels) the request at once
            yield from map(to_chunk, responses)

    @staticmethod
    def _deltas(chunks: Generator[StreamChunk, None, None]) -> Generator[str, None, None]:
        with closing(chunks):
            yield from (chunk.text for chunk in chunks if chunk.text)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

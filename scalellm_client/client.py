"""Synchronous client for the ScaleLLM ensemble over gRPC or HTTP.

    with Client() as llm:
        print(llm.generate("What is the capital of France?", max_tokens=32).text)
        for delta in llm.stream("Tell me a story", temperature=0.8):
            print(delta, end="", flush=True)

A Client may be shared between threads: every call has its own gRPC stream (pooled gRPC clients)
or HTTP connection (pooled keep-alive connections).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ._grpc import GrpcTransport
from ._http import HttpTransport
from ._request import build_request, normalize_url
from ._response import single, to_chunk, to_completion
from ._types import Completion, StreamChunk


class Client:
    """Talks to Triton's ``model`` (the ensemble) at ``url``.

    ``url`` defaults to 127.0.0.1:8001 (gRPC) or 127.0.0.1:8000 (HTTP), with or without
    ``http://``. ``timeout_s`` bounds each whole call (a stream included); None waits forever.
    Every request carries a unique request id; ``cancel_model`` (the ensemble's decoupled ``llm``
    step) is where an abandoned request is cancelled by that id (see the transports' ``cancel``).

    Sampling arguments (all optional; only those set are sent, the server's defaults apply to the
    rest): max_tokens (default 128), temperature, top_k, top_p, seed, stop (str or list of str),
    bad_words, exclude_input_in_output, return_log_probs, repetition_penalty, presence_penalty,
    frequency_penalty, min_tokens, end_id, pad_id, beam_width, length_penalty.
    Server-side failures raise ScaleLLMError with the server's message.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout_s: float | None = None, cancel_model: str = "llm") -> None:
        self.url = normalize_url(url, protocol)
        self.protocol = protocol
        self.model = model
        self._transport: GrpcTransport | HttpTransport = (
            GrpcTransport(self.url, model, timeout_s, cancel_model) if protocol == "grpc"
            else HttpTransport(self.url, model, timeout_s, cancel_model))

    def generate(self, prompt: str, **sampling: Any) -> Completion:
        """The whole completion in one response (``stream=false``)."""
        fields = build_request(prompt, stream=False, **sampling)
        if isinstance(self._transport, HttpTransport):
            return to_completion(self._transport.generate(fields))
        return to_completion(single(list(self._transport.responses(fields))))

    def stream_chunks(self, prompt: str, **sampling: Any) -> Generator[StreamChunk, None, None]:
        """Every streamed response, empty deltas included (for timing tokens).

        Arguments are checked now; the request is sent on the first ``next()``. Closing the
        generator early (``break``, ``.close()``), an error or a timeout cancels the gRPC stream or
        closes the HTTP connection, then asks ``cancel_model`` to stop the request by its id.
        """
        return self._chunks(build_request(prompt, stream=True, **sampling))

    def stream(self, prompt: str, **sampling: Any) -> Generator[str, None, None]:
        """The text as it is generated, as non-empty deltas that concatenate to the full text."""
        return self._deltas(self.stream_chunks(prompt, **sampling))

    def _chunks(self, fields: dict[str, Any]) -> Generator[StreamChunk, None, None]:
        responses = (self._transport.stream(fields) if isinstance(self._transport, HttpTransport)
                     else self._transport.responses(fields))
        try:
            for outputs in responses:
                yield to_chunk(outputs)
        finally:
            responses.close()

    @staticmethod
    def _deltas(chunks: Generator[StreamChunk, None, None]) -> Generator[str, None, None]:
        try:
            for chunk in chunks:
                if chunk.text:
                    yield chunk.text
        finally:
            chunks.close()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

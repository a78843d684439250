"""asyncio client, same arguments and sampling keywords as ``Client`` but awaitable:

    async with AsyncClient() as llm:
        completion = await llm.generate("What is the capital of France?", chat=True)
        async for delta in llm.stream("Tell me a story", chat=True):
            print(delta, end="", flush=True)

One AsyncClient serves any number of concurrent tasks (one gRPC channel, or one aiohttp session,
shared). Leaving an ``async for`` early cancels the request once the generator is finalised; wrap
it in ``contextlib.aclosing`` to make that immediate.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from ._request import build_request, for_model, num_sequences, one_sequence
from ._response import to_chunk, to_completion
from ._types import Completion, StreamChunk
from .client import ClientBase
from .grpc import AioGrpcTransport
from .http import AioHttpTransport


class AsyncClient(ClientBase):
    __doc__ = ClientBase.__doc__
    transports = {"grpc": AioGrpcTransport, "http": AioHttpTransport}

    async def generate(self, prompt: str, **sampling: Any) -> Completion:
        """The whole completion (``stream=false``); several sequences are in ``.choices``."""
        fields = build_request(prompt, stream=False, **sampling)
        info = await self._transport.model_info()
        responses = await self._transport.generate(for_model(fields, self.model, info), info.decoupled)
        return to_completion(responses, num_sequences(fields))

    def stream_chunks(self, prompt: str, **sampling: Any) -> AsyncGenerator[StreamChunk, None]:
        """Every streamed response, empty deltas included (use with ``async for``)."""
        return self._chunks(build_request(prompt, stream=True, **sampling))

    def stream(self, prompt: str, **sampling: Any) -> AsyncGenerator[str, None]:
        """Non-empty text deltas as they are generated (use with ``async for``)."""
        one_sequence(sampling)
        return self._deltas(self.stream_chunks(prompt, **sampling))

    async def _chunks(self, fields: dict[str, Any]) -> AsyncGenerator[StreamChunk, None]:
        responses = self._transport.stream(for_model(fields, self.model, await self._transport.model_info()))
        async with aclosing(responses):  # closing the chunks closes (so cancels) the request
            async for outputs in responses:
                yield to_chunk(outputs)

    @staticmethod
    async def _deltas(chunks: AsyncGenerator[StreamChunk, None]) -> AsyncGenerator[str, None]:
        async with aclosing(chunks):
            async for chunk in chunks:
                if chunk.text:
                    yield chunk.text

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

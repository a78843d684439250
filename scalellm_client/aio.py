"""asyncio client, same API as ``Client`` but awaitable:

    async with AsyncClient() as llm:
        completion = await llm.generate("What is the capital of France?")
        async for delta in llm.stream("Tell me a story"):
            print(delta, end="", flush=True)

One AsyncClient serves any number of concurrent tasks (one gRPC channel, or one aiohttp session,
shared). Leaving an ``async for`` early cancels the request once the generator is finalised; wrap
it in ``contextlib.aclosing`` to make that immediate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from ._grpc import cancel_inputs, infer_inputs, is_last, read_response, triton_error
from ._request import CANCEL_TIMEOUT_S, DRAIN_TIMEOUT_S, build_request, new_request_id, normalize_url
from ._response import Outputs, SSEParser, error_message, parse_event, single, to_chunk, to_completion
from ._types import Completion, ScaleLLMError, StreamChunk, timed_out


class AioGrpcTransport:
    """gRPC via ``tritonclient.grpc.aio``'s ``stream_infer``, one call per request."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        self._url = url
        self._model = model
        self._cancel_model = cancel_model
        self._timeout_s = timeout_s
        self._client: grpcclient_aio.InferenceServerClient | None = None

    def _open(self) -> grpcclient_aio.InferenceServerClient:
        if self._client is None:  # made here, inside the running event loop
            self._client = grpcclient_aio.InferenceServerClient(self._url)
        return self._client

    async def responses(self, fields: Mapping[str, Any]) -> AsyncGenerator[Outputs, None]:
        """Every data response of one request; leaving early sends an explicit ``cancel`` for the
        request's id and reads the call to its final response, cancelling the call only if that fails
        (see ``DRAIN_TIMEOUT_S``)."""
        request = {"model_name": self._model, "inputs": infer_inputs(fields), "request_id": new_request_id()}
        call = self._open().stream_infer(_once(request), stream_timeout=self._timeout_s)
        finished = rejected = False
        try:
            async for result, error in call:
                if error is not None:
                    rejected = True  # an error response ends the request on the server
                    raise triton_error(error)
                outputs, final = read_response(result)
                finished = is_last(outputs, final)
                if outputs is not None:
                    yield outputs
                if finished:
                    break
        except InferenceServerException as exc:
            raise triton_error(exc) from None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise timed_out() from None
            raise ScaleLLMError(_rpc_details(exc), status=str(exc.code())) from None
        finally:
            if not finished and not rejected:
                await self.cancel(request["request_id"])
                finished = await _drain_to_last(call)
            if not finished:
                call.cancel()  # the server cancels the gRPC stream (Triton 2.51 then leaks the request)
        if not finished:
            raise ScaleLLMError("the server ended the stream without a final response")
        await _drain(call)

    async def cancel(self, request_id: str) -> None:
        """Stop request ``request_id`` in the ``cancel_model`` step (best effort, never raises).

        Triton 2.51 does not pass a cancelled *ensemble* request on to its composing models, so
        cancelling the gRPC call alone leaves the decoupled ``llm`` model generating. The ensemble
        passes its request id on to that step, and ``llm`` accepts a control request holding only
        ``cancel_request_id``, answered with one empty final response, which is awaited briefly.
        """
        request = {"model_name": self._cancel_model, "inputs": cancel_inputs(request_id)}
        try:
            call = self._open().stream_infer(_once(request), stream_timeout=CANCEL_TIMEOUT_S)
            await asyncio.wait_for(_drain(call), CANCEL_TIMEOUT_S)
        except Exception:  # cancellation is best effort
            pass

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


async def _once(request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """A one-request stream: ending after it half-closes the stream, so the server ends the call
    after the request's final response."""
    yield request


async def _drain(call: AsyncIterator[Any]) -> None:
    """Let the server end a finished call's stream (it does so right after the final response, as
    ``_once`` has half-closed it) instead of cancelling a request that is already done."""
    try:
        async for _ in call:
            pass
    except (grpc.RpcError, InferenceServerException):
        pass


async def _drain_to_last(call: AsyncIterator[Any]) -> bool:
    """Discard an abandoned call's responses until its final one (True), within ``DRAIN_TIMEOUT_S``."""

    async def until_last() -> bool:
        async for result, error in call:
            if error is not None:
                return False
            if is_last(*read_response(result)):
                return True
        return False

    try:
        return await asyncio.shield(asyncio.wait_for(until_last(), DRAIN_TIMEOUT_S))
    except (asyncio.TimeoutError, grpc.RpcError, InferenceServerException):
        return False


def _rpc_details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return (details() if callable(details) else None) or str(exc)


async def _drain_sse(content: aiohttp.StreamReader) -> bool:
    """Read an abandoned SSE stream to its end (True) within ``DRAIN_TIMEOUT_S``."""

    async def until_end() -> bool:
        async for _ in content:
            pass
        return True

    try:
        return await asyncio.shield(asyncio.wait_for(until_end(), DRAIN_TIMEOUT_S))
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return False


class AioHttpTransport:
    """HTTP via aiohttp: ``generate`` and ``generate_stream`` (SSE read line by line)."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        self._base = f"{url}/v2/models/{quote(model, safe='')}"
        self._cancel_url = f"{url}/v2/models/{quote(cancel_model, safe='')}/generate"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:  # made here, inside the running event loop
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def generate(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        request_id = new_request_id()
        answered = False
        try:
            body_json = {"id": request_id, **fields}
            async with self._open().post(f"{self._base}/generate", json=body_json) as response:
                body = await response.read()
            answered = True
        except asyncio.TimeoutError:
            raise timed_out() from None
        except aiohttp.ClientError as exc:
            raise ScaleLLMError(f"HTTP generate failed: {exc}") from None
        finally:
            if not answered:  # timed out, failed, or the task was cancelled
                await self.cancel(request_id)
        if response.status != 200:
            raise ScaleLLMError(error_message(body) or f"HTTP {response.status}", status=response.status)
        return parse_event(body.decode("utf-8", errors="replace"))

    async def stream(self, fields: Mapping[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Each SSE event of ``generate_stream``; leaving early sends an explicit ``cancel`` for the
        request's id and reads the stream to its end, dropping the connection only if that fails."""
        headers = {"Accept": "text/event-stream"}
        request_id = new_request_id()
        done = False  # the stream was read to its end, or the server refused the request
        try:
            async with self._open().post(f"{self._base}/generate_stream", json={"id": request_id, **fields},
                                         headers=headers) as response:
                if response.status != 200:
                    done = True
                    raise ScaleLLMError(error_message(await response.read()) or f"HTTP {response.status}",
                                        status=response.status)
                try:
                    parser = SSEParser()
                    async for line in response.content:
                        data = parser.feed(line)
                        if data is not None:
                            yield parse_event(data)
                    data = parser.flush()
                    if data is not None:
                        yield parse_event(data)
                    done = True
                finally:
                    if not done:
                        await self.cancel(request_id)
                        done = await _drain_sse(response.content)
                    if not done:
                        response.close()  # drop the connection (Triton 2.51 then leaks the request)
        except asyncio.TimeoutError:
            raise timed_out() from None
        except aiohttp.ClientError as exc:
            raise ScaleLLMError(f"HTTP stream failed: {exc}") from None

    async def cancel(self, request_id: str) -> None:
        """Stop request ``request_id`` in the ``cancel_model`` step (best effort, never raises).

        Triton 2.51 does not pass a cancelled *ensemble* request on to its composing models, so
        closing the connection alone leaves the decoupled ``llm`` model generating. The ensemble
        passes its request id (the JSON "id") on to that step, and ``llm`` accepts a control request
        holding only ``cancel_request_id``.
        """
        try:
            async with self._open().post(self._cancel_url, json={"cancel_request_id": request_id},
                                         timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT_S)) as response:
                await response.read()
        except Exception:  # cancellation is best effort
            pass

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class AsyncClient:
    """asyncio twin of ``scalellm_client.Client``: same arguments, same sampling keywords."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout_s: float | None = None, cancel_model: str = "llm") -> None:
        self.url = normalize_url(url, protocol)
        self.protocol = protocol
        self.model = model
        self._transport: AioGrpcTransport | AioHttpTransport = (
            AioGrpcTransport(self.url, model, timeout_s, cancel_model) if protocol == "grpc"
            else AioHttpTransport(self.url, model, timeout_s, cancel_model))

    async def generate(self, prompt: str, **sampling: Any) -> Completion:
        """The whole completion in one response (``stream=false``)."""
        fields = build_request(prompt, stream=False, **sampling)
        if isinstance(self._transport, AioHttpTransport):
            return to_completion(await self._transport.generate(fields))
        return to_completion(single([outputs async for outputs in self._transport.responses(fields)]))

    def stream_chunks(self, prompt: str, **sampling: Any) -> AsyncGenerator[StreamChunk, None]:
        """Every streamed response, empty deltas included (use with ``async for``)."""
        return self._chunks(build_request(prompt, stream=True, **sampling))

    def stream(self, prompt: str, **sampling: Any) -> AsyncGenerator[str, None]:
        """Non-empty text deltas as they are generated (use with ``async for``)."""
        return self._deltas(self.stream_chunks(prompt, **sampling))

    async def _chunks(self, fields: dict[str, Any]) -> AsyncGenerator[StreamChunk, None]:
        responses = (self._transport.stream(fields) if isinstance(self._transport, AioHttpTransport)
                     else self._transport.responses(fields))
        try:
            async for outputs in responses:
                yield to_chunk(outputs)
        finally:
            await responses.aclose()

    @staticmethod
    async def _deltas(chunks: AsyncGenerator[StreamChunk, None]) -> AsyncGenerator[str, None]:
        try:
            async for chunk in chunks:
                if chunk.text:
                    yield chunk.text
        finally:
            await chunks.aclose()

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

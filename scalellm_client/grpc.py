"""gRPC transport, synchronous (``GrpcTransport``) and asyncio (``AioGrpcTransport``), same methods:

- ``model_info()``: the model's transaction policy and inputs, read once from its configuration;
- ``generate(fields, decoupled)``: every response of one ``stream=false`` request: over the
  streaming RPC (``ModelStreamInfer``) when the model is decoupled, else one ``ModelInfer``;
- ``stream(fields)``: each response of one request as it arrives (decoupled models only);
- ``cancel(request_id)``: the explicit cancel explained in ``_request``'s docstring.

Leaving ``stream`` early (an exception, a timeout, the caller closing the generator) cancels the
request by id and reads the stream to its final response; only if that does not come within
``DRAIN_TIMEOUT_S`` is the gRPC stream itself cancelled.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Mapping
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from ._pool import Pool
from ._request import CANCEL_TIMEOUT_S, DRAIN_TIMEOUT_S, ModelInfo, new_request_id, num_sequences, to_arrays
from ._response import Outputs, count_finished
from ._types import ScaleLLMError, timed_out

# ---- shared by both halves: tensors in, responses out, when a request is over -----------------------------


def infer_inputs(fields: Mapping[str, Any]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array, dtype in to_arrays(fields):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def cancel_inputs(request_id: str) -> list[grpcclient.InferInput]:
    """The control request that stops ``request_id`` in the ``llm`` model: ``cancel_request_id`` alone."""
    tensor = grpcclient.InferInput("cancel_request_id", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[request_id.encode("utf-8")]], dtype=np.object_))
    return [tensor]


def triton_error(exc: InferenceServerException) -> ScaleLLMError:
    status = exc.status()
    if status is not None and "DEADLINE_EXCEEDED" in str(status):
        return timed_out()
    return ScaleLLMError(exc.message() or str(exc), status=status)


def rpc_error(exc: grpc.RpcError) -> ScaleLLMError:
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return timed_out()
    details = getattr(exc, "details", None)
    return ScaleLLMError((details() if callable(details) else None) or str(exc), status=str(exc.code()))


def outputs_of(result: grpcclient.InferResult) -> Outputs | None:
    """The response's tensors, or None for a flags-only response."""
    outputs = result.get_response().outputs
    return {output.name: result.as_numpy(output.name) for output in outputs} if outputs else None


class Progress:
    """Where one streamed request stands. It is over (``done``) at Triton's final-response flag or
    once every sequence has its ``finish_reason``, whichever comes first (an ensemble's final flag
    may come late or, without ``enable_empty_final_response``, never); ``refused`` after an error
    response, which ends the request on the server (a broken stream may not)."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.unfinished = num_sequences(fields)
        self.done = self.refused = False

    def take(self, result: grpcclient.InferResult | None, error: InferenceServerException | None) -> Outputs | None:
        """The data of one arrival (None for a flags-only response); an error response is raised."""
        if error is not None:
            self.refused = error.status() is None
            raise triton_error(error)
        outputs = outputs_of(result)
        self.unfinished -= 0 if outputs is None else count_finished(outputs)
        flag = result.get_response().parameters.get("triton_final_response")
        self.done = self.unfinished <= 0 or (flag is not None and flag.bool_param)
        return outputs

    @property
    def abandoned(self) -> bool:
        """Left before its end while the server may still be generating: cancel it."""
        return not self.done and not self.refused


class _Target:
    """Where both halves send requests, and what they learnt of the model."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        self._url = url
        self._model = model
        self._cancel_model = cancel_model
        self._timeout_s = timeout_s
        self._info: ModelInfo | None = None


# ---- synchronous ------------------------------------------------------------------------------------------


class GrpcTransport(_Target):
    """Pooled ``InferenceServerClient``s: each holds at most one stream, so one per call in flight."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        super().__init__(url, model, timeout_s, cancel_model)
        self._pool: Pool[grpcclient.InferenceServerClient] = Pool(self._connect, lambda client: client.close())

    def _connect(self) -> grpcclient.InferenceServerClient:
        try:
            return grpcclient.InferenceServerClient(self._url)
        except InferenceServerException as exc:
            raise triton_error(exc) from None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            client, _ = self._pool.borrow()
            try:
                config = client.get_model_config(self._model, as_json=True, client_timeout=self._timeout_s)
            except InferenceServerException as exc:
                self._pool.discard(client)
                raise triton_error(exc) from None
            self._pool.give_back(client)
            self._info = ModelInfo.from_config(config)
        return self._info

    def generate(self, fields: Mapping[str, Any], decoupled: bool) -> list[Outputs]:
        if decoupled:
            return list(self.stream(fields))
        inputs, request_id = infer_inputs(fields), new_request_id()
        client, _ = self._pool.borrow()
        try:
            result = client.infer(self._model, inputs, request_id=request_id, client_timeout=self._timeout_s)
        except InferenceServerException as exc:
            self._pool.give_back(client)
            error = triton_error(exc)
            if error.status == "timeout":
                self.cancel(request_id)
            raise error from None
        self._pool.give_back(client)
        return [outputs_of(result) or {}]

    def stream(self, fields: Mapping[str, Any]) -> Generator[Outputs, None, None]:
        inputs = infer_inputs(fields)  # before borrowing a client: bad input raises cleanly
        request_id = new_request_id()
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        arrivals: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        progress = Progress(fields)
        client, _ = self._pool.borrow()
        sent = reusable = False
        try:
            self._send(client, arrivals, self._model, inputs, request_id, self._timeout_s)
            sent = True
            while not progress.done:
                outputs = progress.take(*self._next(arrivals, deadline))
                if outputs is not None:
                    yield outputs
            reusable = True
        except GeneratorExit:  # the caller stopped early: cancelled below, the client stays usable
            reusable = True
            raise
        except InferenceServerException as exc:
            raise triton_error(exc) from None
        finally:
            if sent and progress.abandoned:
                self.cancel(request_id)
                progress.done = self._drain(arrivals, progress)
            self._end_stream(client, cancel=not progress.done, reuse=reusable)

    def cancel(self, request_id: str) -> None:
        """Ask ``cancel_model`` to stop ``request_id``; its one empty final response is awaited briefly."""
        try:
            client, _ = self._pool.borrow()
        except ScaleLLMError:
            return
        arrivals: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        answered = False
        try:
            self._send(client, arrivals, self._cancel_model, cancel_inputs(request_id), None, CANCEL_TIMEOUT_S)
            _, error = arrivals.get(timeout=CANCEL_TIMEOUT_S)
            answered = error is None
        except Exception:  # cancellation is best effort
            pass
        self._end_stream(client, cancel=not answered, reuse=answered)

    @staticmethod
    def _send(client: grpcclient.InferenceServerClient, arrivals: queue.SimpleQueue, model: str,
              inputs: list[grpcclient.InferInput], request_id: str | None, timeout_s: float | None) -> None:
        try:
            client.start_stream(callback=lambda result, error: arrivals.put((result, error)),
                                stream_timeout=timeout_s)
            client.async_stream_infer(model, inputs, request_id=request_id or "", enable_empty_final_response=True)
        except InferenceServerException as exc:
            # A dead stream (e.g. connection refused) reports why through the callback; the
            # exception raised here only says the stream is no longer valid.
            try:
                _, error = arrivals.get_nowait()
            except queue.Empty:
                error = None
            raise triton_error(error or exc) from None

    @staticmethod
    def _next(arrivals: queue.SimpleQueue, deadline: float | None) -> tuple[Any, Any]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return arrivals.get(timeout=timeout)
        except queue.Empty:
            raise timed_out() from None

    @staticmethod
    def _drain(arrivals: queue.SimpleQueue, progress: Progress) -> bool:
        """Discard an abandoned request's responses until its final one (True), within ``DRAIN_TIMEOUT_S``."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        try:
            while not progress.done:
                progress.take(*arrivals.get(timeout=max(0.0, deadline - time.monotonic())))
        except (queue.Empty, ScaleLLMError):
            return False
        return True

    def _end_stream(self, client: grpcclient.InferenceServerClient, cancel: bool, reuse: bool) -> None:
        """Close this call's stream: gracefully once the final response is in (the server then ends
        the stream at once), else with ``cancel_requests=True`` so the server stops working."""
        try:
            client.stop_stream(cancel_requests=cancel)
        except Exception:  # a broken stream only means this client is not reused
            reuse = False
        self._pool.give_back(client, reuse)

    def close(self) -> None:
        self._pool.close()


# ---- asyncio ----------------------------------------------------------------------------------------------


class AioGrpcTransport(_Target):
    """One ``tritonclient.grpc.aio`` client (one channel) for every task; one ``stream_infer`` call a request."""

    _client: grpcclient_aio.InferenceServerClient | None = None

    def _open(self) -> grpcclient_aio.InferenceServerClient:
        if self._client is None:  # made here, inside the running event loop
            self._client = grpcclient_aio.InferenceServerClient(self._url)
        return self._client

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                config = await self._open().get_model_config(self._model, as_json=True,
                                                             client_timeout=self._timeout_s)
            except InferenceServerException as exc:
                raise triton_error(exc) from None
            self._info = ModelInfo.from_config(config)
        return self._info

    async def generate(self, fields: Mapping[str, Any], decoupled: bool) -> list[Outputs]:
        if decoupled:
            return [outputs async for outputs in self.stream(fields)]
        request_id = new_request_id()
        answered = False
        try:
            result = await self._open().infer(self._model, infer_inputs(fields), request_id=request_id,
                                              client_timeout=self._timeout_s)
            answered = True
        except InferenceServerException as exc:
            error = triton_error(exc)
            answered = error.status != "timeout"
            raise error from None
        finally:
            if not answered:  # timed out, or the task was cancelled
                await self.cancel(request_id)
        return [outputs_of(result) or {}]

    async def stream(self, fields: Mapping[str, Any]) -> AsyncGenerator[Outputs, None]:
        request = {"model_name": self._model, "inputs": infer_inputs(fields), "request_id": new_request_id()}
        progress = Progress(fields)
        call = self._open().stream_infer(_once(request), stream_timeout=self._timeout_s)
        try:
            async for result, error in call:
                outputs = progress.take(result, error)
                if outputs is not None:
                    yield outputs
                if progress.done:
                    break
        except InferenceServerException as exc:
            raise triton_error(exc) from None
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        finally:
            if progress.abandoned:
                await self.cancel(request["request_id"])
                progress.done = await _drain_to_last(call, progress)
            if not progress.done:
                call.cancel()  # the server cancels the gRPC stream (Triton 2.51 then leaks the request)
        if not progress.done:
            raise ScaleLLMError("the server ended the stream without a final response")
        await _drain(call)

    async def cancel(self, request_id: str) -> None:
        """Ask ``cancel_model`` to stop ``request_id``; its one empty final response is awaited briefly."""
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


async def _drain_to_last(call: AsyncIterator[Any], progress: Progress) -> bool:
    """Discard an abandoned call's responses until its final one (True), within ``DRAIN_TIMEOUT_S``."""

    async def until_last() -> bool:
        async for result, error in call:
            progress.take(result, error)
            if progress.done:
                return True
        return False

    try:
        return await asyncio.shield(asyncio.wait_for(until_last(), DRAIN_TIMEOUT_S))
    except (asyncio.TimeoutError, ScaleLLMError, grpc.RpcError, InferenceServerException):
        return False

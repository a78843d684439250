"""Synchronous gRPC transport over Triton's bidirectional streaming API.

The ensemble's ``llm`` step is decoupled, so even ``stream=false`` requests go through
``ModelStreamInfer``. A ``tritonclient.grpc.InferenceServerClient`` holds at most one stream at a
time, so every call borrows its own client from a pool (a thread-safe ``SimpleQueue``; new clients
are made on demand). Concurrent calls from many threads are therefore safe and each keeps its own
stream; idle clients are reused so a busy caller doesn't reconnect per request.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Generator, Mapping
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ._request import CANCEL_TIMEOUT_S, DRAIN_TIMEOUT_S, new_request_id, to_arrays
from ._response import Outputs, output_text
from ._types import ScaleLLMError, timed_out


def infer_inputs(fields: Mapping[str, Any]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array, dtype in to_arrays(fields):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def triton_error(exc: InferenceServerException) -> ScaleLLMError:
    status = exc.status()
    if status is not None and "DEADLINE_EXCEEDED" in str(status):
        return timed_out()
    return ScaleLLMError(exc.message() or str(exc), status=status)


def read_response(result: grpcclient.InferResult) -> tuple[Outputs | None, bool | None]:
    """``(outputs or None for a flags-only response, triton_final_response flag or None if absent)``."""
    response = result.get_response()
    flag = response.parameters.get("triton_final_response")
    final = None if flag is None else flag.bool_param
    if not response.outputs:
        return None, final
    return {output.name: result.as_numpy(output.name) for output in response.outputs}, final


def is_last(outputs: Outputs | None, final: bool | None) -> bool:
    """The contract's end (a non-empty finish_reason) or Triton's final-response flag, whichever
    comes first: without ``enable_empty_final_response`` a flags-only final response never arrives."""
    return bool(final) or (outputs is not None and output_text(outputs, "finish_reason") != "")


def cancel_inputs(request_id: str) -> list[grpcclient.InferInput]:
    """The control request that stops ``request_id`` in the ``llm`` model: ``cancel_request_id`` alone."""
    tensor = grpcclient.InferInput("cancel_request_id", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[request_id.encode("utf-8")]], dtype=np.object_))
    return [tensor]


class GrpcTransport:
    """One pooled ``InferenceServerClient`` (and so one gRPC stream) per call in flight."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        self._url = url
        self._model = model
        self._cancel_model = cancel_model
        self._timeout_s = timeout_s
        self._idle: queue.SimpleQueue[grpcclient.InferenceServerClient] = queue.SimpleQueue()
        self._closed = False

    def responses(self, fields: Mapping[str, Any]) -> Generator[Outputs, None, None]:
        """Every data response of one request, as it arrives.

        Leaving early (an exception, or the caller closing the generator) sends an explicit ``cancel``
        for the request's id and reads the stream to its final response (see ``DRAIN_TIMEOUT_S``);
        only if that does not come is the stream closed with ``cancel_requests=True``.
        """
        inputs = infer_inputs(fields)  # before borrowing a client: bad input raises cleanly
        request_id = new_request_id()
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        arrivals: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        client = self._borrow()
        sent = finished = rejected = reusable = False
        try:
            self._send(client, arrivals, inputs, request_id)
            sent = True
            while not finished:
                result, error = self._next(arrivals, deadline)
                if error is not None:
                    # An error response ends the request on the server; a broken stream (status set)
                    # may leave it running.
                    rejected = error.status() is None
                    raise triton_error(error)
                outputs, final = read_response(result)
                finished = is_last(outputs, final)
                if outputs is not None:
                    yield outputs
            reusable = True
        except GeneratorExit:  # the caller stopped early: cancelled below, the client stays usable
            reusable = True
            raise
        except InferenceServerException as exc:
            raise triton_error(exc) from None
        finally:
            if sent and not finished and not rejected:
                self.cancel(request_id)
                finished = self._drain(arrivals)
            self._finish(client, cancel=not finished, reuse=reusable)

    def cancel(self, request_id: str) -> None:
        """Stop request ``request_id`` in the ``cancel_model`` step (best effort, never raises).

        Triton 2.51 does not pass a cancelled *ensemble* request on to its composing models, so
        cancelling the gRPC stream alone leaves the decoupled ``llm`` model generating. The ensemble
        passes its request id on to that step, and ``llm`` accepts a control request holding only
        ``cancel_request_id``, answered with one empty final response, which is awaited briefly.
        """
        try:
            client = self._borrow()
        except ScaleLLMError:
            return
        arrivals: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        answered = False
        try:
            client.start_stream(callback=lambda result, error: arrivals.put((result, error)),
                                stream_timeout=CANCEL_TIMEOUT_S)
            client.async_stream_infer(self._cancel_model, cancel_inputs(request_id),
                                      enable_empty_final_response=True)
            _, error = arrivals.get(timeout=CANCEL_TIMEOUT_S)
            answered = error is None
        except Exception:  # cancellation is best effort
            pass
        self._finish(client, cancel=not answered, reuse=answered)

    @staticmethod
    def _drain(arrivals: queue.SimpleQueue) -> bool:
        """Discard responses until the final one (True) or the drain deadline / an error (False)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            try:
                result, error = arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if error is not None:
                return False
            if is_last(*read_response(result)):
                return True

    def _send(self, client: grpcclient.InferenceServerClient, arrivals: queue.SimpleQueue,
              inputs: list[grpcclient.InferInput], request_id: str) -> None:
        try:
            client.start_stream(callback=lambda result, error: arrivals.put((result, error)),
                                stream_timeout=self._timeout_s)
            client.async_stream_infer(self._model, inputs, request_id=request_id,
                                      enable_empty_final_response=True)
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

    def _borrow(self) -> grpcclient.InferenceServerClient:
        if self._closed:
            raise ScaleLLMError("client is closed")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return grpcclient.InferenceServerClient(self._url)
        except InferenceServerException as exc:
            raise triton_error(exc) from None

    def _finish(self, client: grpcclient.InferenceServerClient, cancel: bool, reuse: bool) -> None:
        """Close this call's stream: gracefully once the final response is in (the server then
        ends the stream at once), else with ``cancel_requests=True`` so the server stops working."""
        try:
            client.stop_stream(cancel_requests=cancel)
        except Exception:  # a broken stream only means this client is not reused
            reuse = False
        if reuse and not self._closed:
            self._idle.put(client)
        else:
            client.close()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

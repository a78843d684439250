"""Triton's gRPC protocol on the router: ``ModelStreamInfer`` requests forwarded one by one to replicas and
``ModelInfer`` calls forwarded to a replica (the same policy, retries and metrics), the ``llm`` model's cancel
forwarded to the replica running that request, and the unary calls clients make around them (server/model
ready, metadata, config) proxied to a healthy replica.

A client's stream may carry many requests; each is forwarded on its own upstream call (one request, then
half-closed) and their responses are interleaved back on the client's stream. A client that cancels its stream
gets every request still running stopped in the engine (see ``dispatch``).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from scalellm.engine.admission import is_retryable

from .dispatch import (
    Dispatcher,
    Job,
    MidStreamFailure,
    NoReplica,
    ReplicaRefused,
    ReplicaUnavailable,
    RequestTimeout,
    Upstream,
    UpstreamRejected,
)
from .replicas import Replica
from .slots import Overloaded
from .upstream import DRAIN_TIMEOUT_S

MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_WAKE = object()
_EOF = object()


class CallRejected(UpstreamRejected):
    """The replica refused a ModelInfer call (bad input, a decoupled model): its status goes back as it is.

    An ``UpstreamRejected``, so the dispatcher takes it as the replica's answer: no retry, nothing to cancel."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(400, (error.details() or "").encode(), "text/plain")
        self.code, self.details = error.code(), error.details() or ""


def _error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(id=request.id, model_name=request.model_name)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


def _input_bytes(request: pb.ModelInferRequest, name: str) -> bytes | None:
    """The first element of a BYTES input, from ``raw_input_contents`` (4-byte length prefix) or contents."""
    for i, tensor in enumerate(request.inputs):
        if tensor.name != name:
            continue
        if request.raw_input_contents:
            raw = request.raw_input_contents[i]
            size = int.from_bytes(raw[:4], "little")
            return raw[4:4 + size]
        return tensor.contents.bytes_contents[0] if tensor.contents.bytes_contents else None
    return None


def _input_int(request: pb.ModelInferRequest, name: str) -> int | None:
    for i, tensor in enumerate(request.inputs):
        if tensor.name != name:
            continue
        if request.raw_input_contents:
            return int.from_bytes(request.raw_input_contents[i][:4], "little", signed=True)
        return tensor.contents.int_contents[0] if tensor.contents.int_contents else None
    return None


def job_of(request: pb.ModelInferRequest) -> Job:
    text = (_input_bytes(request, "text_input") or b"").decode("utf-8", errors="replace")
    return Job.of(text, _input_int(request, "max_tokens"), _input_int(request, "num_return_sequences"), request.id)


def cancel_request(model: str, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="cancel_request_id", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(request_id.encode())
    return request


async def abort_unplaced(context: grpc.aio.ServicerContext, exc: NoReplica | Overloaded) -> None:
    """End a unary call the router cannot place: UNAVAILABLE (gRPC's 503), the message, and a ``retry-after``
    trailer in seconds (a stream's requests get the message alone: the stream carries others too)."""
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc),
                        trailing_metadata=(("retry-after", str(exc.retry_after_s)),))


async def _one(request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
    yield request  # then half-close: the replica ends the call after the request's last response


async def _pump(call: grpc.aio.StreamStreamCall, arrivals: asyncio.Queue) -> None:
    try:
        async for response in call:
            arrivals.put_nowait(response)
        arrivals.put_nowait(_EOF)
    except grpc.aio.AioRpcError as exc:
        arrivals.put_nowait(exc)


async def _give_up_after(reader: asyncio.Task, call: grpc.aio.StreamStreamCall, timeout_s: float) -> None:
    """Let an abandoned call's reader finish (its request was cancelled by id); cancel the call if it does not."""
    try:
        await asyncio.wait_for(asyncio.shield(reader), timeout_s)
    except Exception:  # noqa: BLE001
        call.cancel()
        reader.cancel()


class TritonGrpc(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._stubs: dict[str, pb_grpc.GRPCInferenceServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, replica: Replica) -> pb_grpc.GRPCInferenceServiceStub:
        stub = self._stubs.get(replica.name)
        if stub is None:
            channel = grpc.aio.insecure_channel(replica.address.grpc_target, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[replica.name] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)

    # ---- streaming inference -------------------------------------------------------------------------------
    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 - the service's method name
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        reading = [True]

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            out.put_nowait(_WAKE)

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.get_running_loop().create_task(self._forward(request, out))
                    tasks.add(task)
                    task.add_done_callback(finished)
            finally:
                reading[0] = False
                out.put_nowait(_WAKE)

        reader = asyncio.get_running_loop().create_task(read_requests())
        try:
            while True:
                item = await out.get()
                if item is _WAKE:
                    if not reading[0] and not tasks:
                        return
                    continue
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _forward(self, request: pb.ModelInferRequest, out: asyncio.Queue) -> None:
        try:
            if self._is_cancel(request):
                await self._forward_cancel(request, out)
                return
            job = job_of(request)
            async with aclosing(self.dispatcher.run(job, lambda up: self._attempt(up, request))) as responses:
                async for response in responses:
                    out.put_nowait(response)
        except (NoReplica, MidStreamFailure, Overloaded, RequestTimeout) as exc:
            # one request of the client's stream failed, not the stream: its error travels as a message (an
            # Overloaded one starts with "server busy" and says when to retry)
            out.put_nowait(_error(request, str(exc)))
        except grpc.aio.AioRpcError as exc:
            out.put_nowait(_error(request, f"replica error: {exc.code().name}: {exc.details()}"))

    def _is_cancel(self, request: pb.ModelInferRequest) -> bool:
        return (request.model_name == self.dispatcher.config.cancel_model
                and [t.name for t in request.inputs] == ["cancel_request_id"])

    async def _forward_cancel(self, request: pb.ModelInferRequest, out: asyncio.Queue) -> None:
        client_id = (_input_bytes(request, "cancel_request_id") or b"").decode("utf-8", errors="replace")
        upstream = self.dispatcher.by_client_id.get(client_id)
        if upstream is not None:
            replica, forwarded = upstream.replica, cancel_request(request.model_name, upstream.request_id)
        else:
            replica, forwarded = self.dispatcher.healthy_replica(), request
        forwarded.id = request.id
        forwarded.parameters.MergeFrom(request.parameters)
        async for response in self.stub(replica).ModelStreamInfer(_one(forwarded)):
            out.put_nowait(response)

    async def _attempt(self, upstream: Upstream, request: pb.ModelInferRequest
                       ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        """The upstream call is read by its own task, so a client that leaves cancels only the wait here: the
        call itself is read on to its end once the request is cancelled by id (cancelling a gRPC call would
        leave Triton 2.51 counting the ensemble request in flight)."""
        forwarded = pb.ModelInferRequest()
        forwarded.CopyFrom(request)
        forwarded.id = upstream.request_id
        call = self.stub(upstream.replica).ModelStreamInfer(_one(forwarded))
        arrivals: asyncio.Queue = asyncio.Queue()
        reader = asyncio.get_running_loop().create_task(_pump(call, arrivals))
        done = answered = False
        try:
            while True:
                item = await arrivals.get()
                if item is _EOF:
                    done = True
                    return
                if isinstance(item, grpc.aio.AioRpcError):
                    done = True
                    if item.code() in UNAVAILABLE_CODES:
                        raise ReplicaUnavailable(f"gRPC {item.code().name}: {item.details()}")
                    raise item
                if not answered and item.error_message and is_retryable(item.error_message):
                    raise ReplicaRefused(item.error_message)  # the engine's "not now": the call ends by itself
                answered = True
                if item.infer_response.id == upstream.request_id:
                    item.infer_response.id = request.id
                yield item
        finally:
            if not done:
                self.dispatcher.spawn(_give_up_after(reader, call, DRAIN_TIMEOUT_S))

    # ---- unary inference ---------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):  # noqa: N802
        """One request, one response (non-decoupled models): the replica's error status is passed on as it is."""
        answer = None
        try:
            async with aclosing(self.dispatcher.run(job_of(request), lambda up: self._infer(up, request))) as answers:
                async for item in answers:  # read to the end, so the request counts as finished
                    answer = item
        except (NoReplica, Overloaded) as exc:
            await abort_unplaced(context, exc)
        except RequestTimeout as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except CallRejected as exc:
            await context.abort(exc.code, exc.details)
        if answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica sent no response")
        return answer

    async def _infer(self, upstream: Upstream, request: pb.ModelInferRequest
                     ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """Like ``_attempt``: a client that leaves cancels only the wait, the call is read on to its end."""
        forwarded = pb.ModelInferRequest()
        forwarded.CopyFrom(request)
        forwarded.id = upstream.request_id
        call = self.stub(upstream.replica).ModelInfer(forwarded)
        reader = asyncio.ensure_future(call)
        try:
            response = await asyncio.shield(reader)
        except asyncio.CancelledError:
            self.dispatcher.spawn(_give_up_after(reader, call, DRAIN_TIMEOUT_S))
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise ReplicaUnavailable(f"gRPC {exc.code().name}: {exc.details()}") from None
            if is_retryable(exc.details() or ""):
                raise ReplicaRefused(exc.details()) from None  # the engine's "not now": tried again elsewhere
            raise CallRejected(exc) from None
        if response.id == upstream.request_id:
            response.id = request.id
        yield response

    # ---- unary calls -------------------------------------------------------------------------------------
    async def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.dispatcher.any_healthy)

    async def _proxy(self, name: str, request, context):  # type: ignore[no-untyped-def]
        try:
            replica = self.dispatcher.healthy_replica()
        except NoReplica as exc:
            await abort_unplaced(context, exc)
        try:
            return await getattr(self.stub(replica), name)(request)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def ModelReady(self, request, context):  # noqa: N802
        return await self._proxy("ModelReady", request, context)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return await self._proxy("ServerMetadata", request, context)

    async def ModelMetadata(self, request, context):  # noqa: N802
        return await self._proxy("ModelMetadata", request, context)

    async def ModelConfig(self, request, context):  # noqa: N802
        return await self._proxy("ModelConfig", request, context)

    async def ModelStatistics(self, request, context):  # noqa: N802
        return await self._proxy("ModelStatistics", request, context)



class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """``authorization: Bearer <key>`` metadata required on every call but ServerLive/ServerReady."""

    OPEN = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ())}
        given = str(metadata.get("authorization", "")).encode()
        if method in self.OPEN or hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        message = "missing or wrong API key: send metadata authorization: Bearer <key>"

        async def deny(_request, context):  # type: ignore[no-untyped-def]
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if method.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


async def serve_grpc(servicer: TritonGrpc, host: str, port: int, api_key: str | None = None) -> grpc.aio.Server:
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server

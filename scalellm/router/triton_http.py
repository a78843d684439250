"""Triton's HTTP protocol on the router: ``generate`` / ``generate_stream`` and KServe ``infer`` forwarded to a
replica, the ``llm`` model's cancel forwarded to the replica running that request, health, and read-only model
endpoints proxied to a healthy replica."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import aiohttp
from aiohttp import web

from .dispatch import Attempt, Dispatcher, Job, MidStreamFailure, NoReplica, RequestTimeout, UpstreamRejected
from .kserve import HEADER_LENGTH, BadInferBody, InferBody
from .slots import Overloaded
from .upstream import generate_once, infer_once, sse_events


def triton_error(status: int, message: str, retry_after_s: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


def unplaced(exc: NoReplica | Overloaded) -> web.Response:
    """503 + Retry-After: no healthy replica, or none with room in time (the message says "server busy")."""
    return triton_error(503, str(exc), exc.retry_after_s)


def _first(value: Any) -> Any:
    """A generate field's value: JSON may nest it in lists, as a tensor's shape would."""
    while isinstance(value, list) and value:
        value = value[0]
    return value


def job_of(fields: dict[str, Any], client_id: str) -> Job:
    text = _first(fields.get("text_input", ""))
    return Job.of(text if isinstance(text, str) else "", _first(fields.get("max_tokens")),
                  _first(fields.get("num_return_sequences")), client_id)


class TritonHttp:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v2/models/{model}/generate", self.generate),
            web.post("/v2/models/{model}/generate_stream", self.generate_stream),
            web.post("/v2/models/{model}/infer", self.infer),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2/health/live", self.live),
            web.get("/v2", self.proxy_get),
            web.get("/v2/models/{model}", self.proxy_get),
            web.get("/v2/models/{model}/ready", self.proxy_get),
            web.get("/v2/models/{model}/config", self.proxy_get),
        ]

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.dispatcher.any_healthy else 503)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def proxy_get(self, request: web.Request) -> web.Response:
        try:
            replica = self.dispatcher.healthy_replica()
        except NoReplica as exc:
            return unplaced(exc)
        try:
            async with self.dispatcher.session.get(f"{replica.address.http_url}{request.rel_url}") as response:
                return web.Response(status=response.status, body=await response.read(),
                                    content_type=response.content_type)
        except (aiohttp.ClientError, OSError) as exc:
            replica.set_healthy(False, repr(exc))
            return triton_error(503, f"replica {replica.name} did not answer: {exc!r}")

    @staticmethod
    async def _fields(request: web.Request) -> dict[str, Any]:
        try:
            fields = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": f"request body is not JSON: {exc}"}),
                                     content_type="application/json") from None
        if not isinstance(fields, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "request body must be a JSON object"}),
                                     content_type="application/json")
        return fields

    async def _cancel(self, model: str, fields: dict[str, Any]) -> web.Response | None:
        """The client's own cancel of a request it sent through the router: forward it to that replica."""
        if model != self.dispatcher.config.cancel_model or set(fields) - {"cancel_request_id", "id"}:
            return None
        upstream = self.dispatcher.by_client_id.get(str(fields.get("cancel_request_id")))
        if upstream is not None:
            await self.dispatcher.cancel(upstream)
        return web.json_response({"model_name": model, "model_version": "1"})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        fields = await self._fields(request)
        cancelled = await self._cancel(model, fields)
        if cancelled is not None:
            return cancelled
        client_id = fields.pop("id", None)
        session, spawn = self.dispatcher.session, self.dispatcher.spawn
        return await self._unary(job_of(fields, client_id or ""),
                                 lambda up: generate_once(session, up, model, fields, client_id, spawn),
                                 lambda body: web.Response(body=body, content_type="application/json"))

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """KServe v2 infer (JSON or Triton's binary tensor extension), as perf_analyzer and tritonclient send it."""
        model = request.match_info["model"]
        try:
            body = InferBody.parse(await request.read(), request.headers.get(HEADER_LENGTH),
                                   request.headers.get("Content-Encoding"))
        except BadInferBody as exc:
            return triton_error(400, str(exc))
        client_id = body.header.pop("id", None)
        job = Job.of(body.first_value("text_input") or "", body.first_value("max_tokens"),
                     body.first_value("num_return_sequences"), str(client_id or ""))
        session, spawn = self.dispatcher.session, self.dispatcher.spawn
        return await self._unary(job, lambda up: infer_once(session, up, model, body, client_id, spawn),
                                 lambda answer: web.Response(body=answer[0], headers=answer[1]))

    async def _unary(self, job: Job, attempt: Attempt, respond: Callable[[Any], web.Response]) -> web.Response:
        """A request answered once (``generate``, ``infer``): ``respond`` to its last answer, or the error every
        door gives (the replica's refusal as it is, 503 + Retry-After when it cannot be placed, 504 past its time)."""
        answer = None
        try:
            async with aclosing(self.dispatcher.run(job, attempt)) as answers:
                async for item in answers:  # read to the end, so the request counts as finished
                    answer = item
        except UpstreamRejected as exc:
            return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
        except (NoReplica, Overloaded) as exc:
            return unplaced(exc)
        except RequestTimeout as exc:
            return triton_error(504, str(exc))
        if answer is None:
            return triton_error(502, "the replica sent no response")
        return respond(answer)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        fields = await self._fields(request)
        client_id = fields.pop("id", None)
        job = job_of(fields, client_id or "")
        session, spawn = self.dispatcher.session, self.dispatcher.spawn
        response: web.StreamResponse | None = None
        try:
            async with aclosing(self.dispatcher.run(
                    job, lambda up: sse_events(session, up, model, fields, client_id, spawn))) as events:
                async for event in events:
                    if response is None:  # only now: until the first event a failed replica can be retried
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                    await response.write(event)
        except UpstreamRejected as exc:
            return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
        except (NoReplica, Overloaded) as exc:
            return unplaced(exc)
        except (MidStreamFailure, RequestTimeout) as exc:
            if response is None:
                return triton_error(504, str(exc))
            await response.write(b"data: " + json.dumps({"error": str(exc)}).encode() + b"\n\n")
        if response is None:
            return triton_error(502, "the replica ended the stream without a response")
        await response.write_eof()
        return response

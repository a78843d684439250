"""Attempts over a replica's HTTP endpoints: Triton's ``generate``, ``generate_stream`` (SSE) and KServe ``infer``.

Failures that mean "this replica is not there" (refused, reset, closed early, 502/503/504) raise
``ReplicaUnavailable`` so the dispatcher can retry or report. The engine's "not now" (server busy, shutting
down: ``scalellm.engine.admission.is_retryable``; Triton 2.51 sends it to HTTP clients of a decoupled model as a
400) raises ``ReplicaRefused``, tried again by the dispatcher. Any other error status is the replica's answer
(e.g. a 400 naming a bad field) and raises ``UpstreamRejected`` with its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from scalellm.engine.admission import is_retryable

from .dispatch import ReplicaRefused, ReplicaUnavailable, Upstream, UpstreamRejected
from .kserve import HEADER_LENGTH, InferBody, answer_with_id

UNAVAILABLE_STATUS = (502, 503, 504)
Spawn = Callable[[Coroutine[Any, Any, None]], None]
_TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


def id_rewriter(upstream_id: str, client_id: str | None) -> tuple[bytes, bytes]:
    """(what the replica writes, what the client should see) for the ``"id"`` field of Triton's JSON."""
    needle = b'"id":' + json.dumps(upstream_id).encode()
    if client_id is None:
        return needle + b",", b""  # the client gave no id: Triton would not have written one
    return needle, b'"id":' + json.dumps(client_id).encode()


def _url(upstream: Upstream, model: str, endpoint: str) -> str:
    return f"{upstream.replica.address.http_url}/v2/models/{quote(model, safe='')}/{endpoint}"


def error_message(body: bytes) -> str:
    """The message of a Triton error body: ``{"error": ...}``, possibly as one SSE event."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text


async def _check(response: aiohttp.ClientResponse) -> None:
    if response.status in UNAVAILABLE_STATUS:
        raise ReplicaUnavailable(f"HTTP {response.status}: {(await response.read())[:200]!r}")
    if response.status != 200:
        body = await response.read()
        if is_retryable(message := error_message(body)):
            raise ReplicaRefused(message)
        raise UpstreamRejected(response.status, body, response.content_type)


DRAIN_TIMEOUT_S = 5.0


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read an abandoned stream to its end (its request was cancelled by id, so the end comes soon), then free
    the connection. Dropping it instead would leave Triton 2.51 counting the ensemble request in flight."""
    try:
        await asyncio.wait_for(response.read(), DRAIN_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the connection is dropped below
        pass
    response.close()


@contextlib.asynccontextmanager
async def _posted(session: aiohttp.ClientSession, url: str, spawn: Spawn,
                  **kwargs: Any) -> AsyncGenerator[aiohttp.ClientResponse, None]:
    """POST ``url`` and hand over the checked response. Transport errors become ``ReplicaUnavailable``; a body
    read to its end (or an error) frees the connection, one left unread (the client went away) is drained."""
    try:
        response = await session.post(url, **kwargs)
    except _TRANSPORT_ERRORS as exc:
        raise ReplicaUnavailable(repr(exc)) from None
    done = False
    try:
        await _check(response)
        yield response
        done = True
    except _TRANSPORT_ERRORS as exc:
        done = True
        raise ReplicaUnavailable(repr(exc)) from None
    except (UpstreamRejected, ReplicaRefused):
        done = True
        raise
    finally:
        if done:
            response.release()
        else:
            spawn(_drain(response))


async def sse_events(session: aiohttp.ClientSession, upstream: Upstream, model: str, fields: Mapping[str, Any],
                     client_id: str | None, spawn: Spawn) -> AsyncGenerator[bytes, None]:
    """Each SSE event of ``generate_stream`` as raw bytes (blank line included), the ``id`` put back."""
    needle, replacement = id_rewriter(upstream.request_id, client_id)
    body = {**fields, "id": upstream.request_id}
    url, headers = _url(upstream, model, "generate_stream"), {"Accept": "text/event-stream"}
    async with _posted(session, url, spawn, json=body, headers=headers) as response:
        event: list[bytes] = []
        first = True
        async for line in response.content:
            event.append(line)
            if line in (b"\n", b"\r\n"):
                raw, event = b"".join(event), []
                if first and b'"error"' in raw and is_retryable(message := error_message(raw)):
                    raise ReplicaRefused(message)  # an engine refusal sent as the stream's only event
                first = False
                yield raw.replace(needle, replacement, 1)
        if event:
            yield b"".join(event).replace(needle, replacement, 1)


async def generate_once(session: aiohttp.ClientSession, upstream: Upstream, model: str, fields: Mapping[str, Any],
                        client_id: str | None, spawn: Spawn) -> AsyncGenerator[bytes, None]:
    """The one JSON body of ``generate``, the ``id`` put back."""
    needle, replacement = id_rewriter(upstream.request_id, client_id)
    body = {**fields, "id": upstream.request_id}
    async with _posted(session, _url(upstream, model, "generate"), spawn, json=body) as response:
        data = await response.read()
    yield data.replace(needle, replacement, 1)


async def infer_once(session: aiohttp.ClientSession, upstream: Upstream, model: str, body: InferBody,
                     client_id: str | None, spawn: Spawn) -> AsyncGenerator[tuple[bytes, dict[str, str]], None]:
    """The one answer of KServe ``infer`` (body and content headers), the ``id`` put back."""
    data, headers = body.with_id(upstream.request_id)
    headers["Accept-Encoding"] = "identity"  # the answer's header is read here (the session does not decompress)
    async with _posted(session, _url(upstream, model, "infer"), spawn, data=data, headers=headers) as response:
        answer = await response.read()
        header_length = response.headers.get(HEADER_LENGTH)
    yield answer_with_id(answer, header_length, client_id)


def parse_sse(event: bytes) -> dict[str, Any]:
    """The JSON of one SSE event (``data:`` lines joined)."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    return json.loads(b"\n".join(lines)) if lines else {}


def first(value: Any) -> Any:
    """Triton's JSON writes a 1-element output as a scalar and a longer one as a (nested) list."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value


def flat(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        return [value]
    return [x for item in value for x in flat(item)]

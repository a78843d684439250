"""HTTP transport over Triton's ``generate`` / ``generate_stream`` endpoints, synchronous
(``HttpTransport``, http.client) and asyncio (``AioHttpTransport``, aiohttp, imported only when an
``AioHttpTransport`` is made), with the same methods as the gRPC transports:

- ``model_info()``: the model's transaction policy and inputs (``GET /v2/models/<m>/config``);
- ``generate(fields, decoupled)``: every response of one ``stream=false`` request: ``generate``
  (which takes exactly one response), or ``generate_stream`` for several sequences of a decoupled model;
- ``stream(fields)``: each Server-Sent Event of ``generate_stream`` as it arrives;
- ``cancel(request_id)``: the explicit cancel explained in ``_request``'s docstring.

Leaving ``stream`` early cancels the request by id and reads the stream to its end; only if that
does not end within ``DRAIN_TIMEOUT_S`` is the connection dropped.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from ._pool import Pool
from ._request import CANCEL_TIMEOUT_S, DRAIN_TIMEOUT_S, ModelInfo, new_request_id, num_sequences
from ._response import Outputs, SSEParser, error_message, parse_event
from ._types import ScaleLLMError, timed_out

if TYPE_CHECKING:
    import aiohttp

# A pooled keep-alive connection the server has since closed fails like this before any response.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
JSON = "application/json"
SSE = "text/event-stream"


def _paths(url: str, model: str, cancel_model: str) -> tuple[str, str]:
    """The model's ``/v2/models/<m>`` and the cancel model's ``generate`` path under ``url``'s path."""
    prefix = urlsplit(url).path.rstrip("/")
    return (f"{prefix}/v2/models/{quote(model, safe='')}",
            f"{prefix}/v2/models/{quote(cancel_model, safe='')}/generate")


def _body(fields: Mapping[str, Any], request_id: str) -> bytes:
    return json.dumps({"id": request_id, **fields}).encode("utf-8")


def _cancel_body(request_id: str) -> bytes:
    return json.dumps({"cancel_request_id": request_id}).encode("utf-8")


def _arm(conn: http.client.HTTPConnection, deadline: float | None) -> None:
    """Make the next socket operation time out at the call's deadline, so ``timeout_s`` bounds
    the whole call (as over gRPC), not each read."""
    if deadline is not None and conn.sock is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.sock.settimeout(left)


# ---- synchronous ------------------------------------------------------------------------------------------


class HttpTransport:
    """Keep-alive connections in a ``Pool`` (one per call in flight), so threads may share it."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base, self._cancel_path = _paths(url, model, cancel_model)
        self._timeout_s = timeout_s
        self._pool: Pool[http.client.HTTPConnection] = Pool(
            lambda: self._cls(self._host, self._port, timeout=self._timeout_s), lambda conn: conn.close())
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            deadline = self._deadline()
            conn, response = self._send("GET", f"{self._base}/config", None, JSON, deadline, None)
            self._info = ModelInfo.from_config(json.loads(self._read(conn, response, deadline, None)))
        return self._info

    def generate(self, fields: Mapping[str, Any], decoupled: bool) -> list[Outputs]:
        if decoupled and num_sequences(fields) > 1:
            return list(self.stream(fields))
        request_id, deadline = new_request_id(), self._deadline()
        conn, response = self._send("POST", f"{self._base}/generate", _body(fields, request_id), JSON, deadline,
                                    request_id)
        return [parse_event(self._read(conn, response, deadline, request_id))]

    def stream(self, fields: Mapping[str, Any]) -> Generator[Outputs, None, None]:
        request_id, deadline = new_request_id(), self._deadline()
        conn, response = self._send("POST", f"{self._base}/generate_stream", _body(fields, request_id), SSE,
                                    deadline, request_id)
        done = False
        try:
            parser, line = SSEParser(), b"\n"
            while line:
                _arm(conn, deadline)
                line = response.readline()
                yield from parser.feed(line)
            done = True
        except TimeoutError:
            raise timed_out() from None
        except OSError as exc:
            raise ScaleLLMError(f"HTTP stream failed: {exc}") from None
        finally:
            if not done:
                self.cancel(request_id)
                done = self._drain(conn, response)
            self._release(conn, response, done)

    def cancel(self, request_id: str) -> None:
        """Ask ``cancel_model`` to stop ``request_id``, on a short-lived connection of its own."""
        conn = self._cls(self._host, self._port, timeout=CANCEL_TIMEOUT_S)
        try:
            conn.request("POST", self._cancel_path, body=_cancel_body(request_id), headers={"Content-Type": JSON})
            conn.getresponse().read()
        except Exception:  # cancellation is best effort
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._pool.close()

    def _deadline(self) -> float | None:
        return None if self._timeout_s is None else time.monotonic() + self._timeout_s

    def _send(self, method: str, path: str, body: bytes | None, accept: str, deadline: float | None,
              request_id: str | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the request; a 200 response is returned unread, anything else raised (after
        cancelling ``request_id`` if it timed out)."""
        headers = {"Content-Type": JSON, "Accept": accept}
        conn, reused = self._pool.borrow()
        try:
            _arm(conn, deadline)  # a reused connection keeps the previous call's timeout
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
            except _STALE:
                if not reused:
                    raise
                conn.close()  # http.client reconnects on the next request
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
            if response.status != 200:
                message = error_message(response.read())
                self._release(conn, response, True)
                raise ScaleLLMError(message or f"HTTP {response.status} {response.reason}", status=response.status)
        except TimeoutError:
            self._pool.discard(conn)
            if request_id is not None:
                self.cancel(request_id)
            raise timed_out() from None
        except OSError as exc:  # refused, unreachable, reset
            self._pool.discard(conn)
            raise ScaleLLMError(f"cannot reach {self._host}:{self._port}: {exc}") from None
        return conn, response

    def _read(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, deadline: float | None,
              request_id: str | None) -> str:
        """The whole body of a 200 response (cancelling ``request_id`` if reading it fails)."""
        try:
            _arm(conn, deadline)
            body = response.read()
        except OSError as exc:
            self._pool.discard(conn)
            if request_id is not None:
                self.cancel(request_id)
            if isinstance(exc, TimeoutError):
                raise timed_out() from None
            raise ScaleLLMError(f"HTTP request failed while reading the response: {exc}") from None
        self._release(conn, response, True)
        return body.decode("utf-8", errors="replace")

    @staticmethod
    def _drain(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> bool:
        """Read an abandoned stream to its end (True) within ``DRAIN_TIMEOUT_S``, else False."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        try:
            while True:
                _arm(conn, deadline)
                if not response.readline():
                    return True
        except OSError:
            return False

    def _release(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, done: bool) -> None:
        """Keep the connection for the next call if its response was read to the end and the server
        did not ask to close it."""
        self._pool.give_back(conn, done and not response.will_close and response.isclosed())


# ---- asyncio ----------------------------------------------------------------------------------------------


class AioHttpTransport:
    """One aiohttp session (its own connection pool) for every task."""

    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        import aiohttp  # here, not at the top: synchronous users never load it

        self._aiohttp = aiohttp
        base, cancel_path = _paths(url, model, cancel_model)
        origin = url[:len(url) - len(urlsplit(url).path)]
        self._base, self._cancel_url = origin + base, origin + cancel_path
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._info: ModelInfo | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:  # made here, inside the running event loop
            self._session = self._aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.from_config(json.loads(await self._call("GET", "config", None, None)))
        return self._info

    async def generate(self, fields: Mapping[str, Any], decoupled: bool) -> list[Outputs]:
        if decoupled and num_sequences(fields) > 1:
            return [event async for event in self.stream(fields)]
        return [parse_event(await self._call("POST", "generate", fields, new_request_id()))]

    async def stream(self, fields: Mapping[str, Any]) -> AsyncGenerator[Outputs, None]:
        request_id = new_request_id()
        done = False  # the stream was read to its end, or the server refused the request
        try:
            async with self._open().post(f"{self._base}/generate_stream", data=_body(fields, request_id),
                                         headers={"Content-Type": JSON, "Accept": SSE}) as response:
                if response.status != 200:
                    done = True
                    raise ScaleLLMError(error_message(await response.read()) or f"HTTP {response.status}",
                                        status=response.status)
                try:
                    parser = SSEParser()
                    async for line in response.content:
                        for event in parser.feed(line):
                            yield event
                    for event in parser.feed(b""):
                        yield event
                    done = True
                finally:
                    if not done:
                        await self.cancel(request_id)
                        done = await self._drain(response.content)
                    if not done:
                        response.close()  # drop the connection (Triton 2.51 then leaks the request)
        except asyncio.TimeoutError:
            raise timed_out() from None
        except self._aiohttp.ClientError as exc:
            raise ScaleLLMError(f"HTTP stream failed: {exc}") from None

    async def cancel(self, request_id: str) -> None:
        """Ask ``cancel_model`` to stop ``request_id``."""
        try:
            async with self._open().post(self._cancel_url, data=_cancel_body(request_id),
                                         headers={"Content-Type": JSON},
                                         timeout=self._aiohttp.ClientTimeout(total=CANCEL_TIMEOUT_S)) as response:
                await response.read()
        except Exception:  # cancellation is best effort
            pass

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, endpoint: str, fields: Mapping[str, Any] | None,
                    request_id: str | None) -> str:
        """One request, one whole response body; a request left unanswered (timed out, failed, the
        task cancelled) is cancelled by id."""
        answered = False
        try:
            async with self._open().request(method, f"{self._base}/{endpoint}", headers={"Content-Type": JSON},
                                            data=None if fields is None else _body(fields, request_id or "")
                                            ) as response:
                body = await response.read()
            answered = True
        except asyncio.TimeoutError:
            raise timed_out() from None
        except self._aiohttp.ClientError as exc:
            raise ScaleLLMError(f"HTTP request failed: {exc}") from None
        finally:
            if not answered and request_id is not None:
                await self.cancel(request_id)
        if response.status != 200:
            raise ScaleLLMError(error_message(body) or f"HTTP {response.status}", status=response.status)
        return body.decode("utf-8", errors="replace")

    async def _drain(self, content: aiohttp.StreamReader) -> bool:
        """Read an abandoned SSE stream to its end (True) within ``DRAIN_TIMEOUT_S``."""

        async def until_end() -> bool:
            async for _ in content:
                pass
            return True

        try:
            return await asyncio.shield(asyncio.wait_for(until_end(), DRAIN_TIMEOUT_S))
        except (asyncio.TimeoutError, self._aiohttp.ClientError):
            return False

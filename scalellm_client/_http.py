"""Synchronous HTTP transport: Triton's ``generate`` / ``generate_stream`` endpoints via http.client.

Connections are kept alive in a thread-safe pool (one per concurrent call), so the client can be
shared between threads. Streams are read line by line as the server sends them (never buffered).
"""

from __future__ import annotations

import http.client
import json
import queue
import time
from collections.abc import Generator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from ._request import CANCEL_TIMEOUT_S, DRAIN_TIMEOUT_S, new_request_id
from ._response import SSEParser, error_message, parse_event
from ._types import ScaleLLMError, timed_out

# A pooled keep-alive connection the server has since closed fails like this before any response.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _arm(conn: http.client.HTTPConnection, deadline: float | None) -> None:
    """Make the next socket operation time out at the call's deadline, so ``timeout_s`` bounds
    the whole call (as over gRPC), not each read."""
    if deadline is not None and conn.sock is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.sock.settimeout(left)


class HttpTransport:
    def __init__(self, url: str, model: str, timeout_s: float | None, cancel_model: str = "llm") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = f"{parts.path.rstrip('/')}/v2/models/{quote(model, safe='')}"
        self._cancel_path = f"{parts.path.rstrip('/')}/v2/models/{quote(cancel_model, safe='')}/generate"
        self._timeout_s = timeout_s
        self._idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()
        self._closed = False

    def generate(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        request_id = new_request_id()
        deadline = self._deadline()
        conn, response = self._post("generate", fields, "application/json", deadline, request_id)
        try:
            _arm(conn, deadline)
            body = response.read()
        except TimeoutError:
            conn.close()
            self.cancel(request_id)
            raise timed_out() from None
        except OSError as exc:
            conn.close()
            self.cancel(request_id)
            raise ScaleLLMError(f"HTTP generate failed while reading the response: {exc}") from None
        self._release(conn, response)
        return parse_event(body.decode("utf-8", errors="replace"))

    def stream(self, fields: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        """Each SSE event of ``generate_stream``; leaving early sends an explicit ``cancel`` for the
        request's id and reads the stream to its end (closing the connection only if that fails)."""
        request_id = new_request_id()
        deadline = self._deadline()
        conn, response = self._post("generate_stream", fields, "text/event-stream", deadline, request_id)
        done = False
        try:
            parser = SSEParser()
            while True:
                _arm(conn, deadline)
                line = response.readline()
                data = parser.feed(line) if line else parser.flush()
                if data is not None:
                    yield parse_event(data)
                if not line:
                    break
            done = True
        except TimeoutError:
            raise timed_out() from None
        except OSError as exc:
            raise ScaleLLMError(f"HTTP stream failed: {exc}") from None
        finally:
            if not done:
                self.cancel(request_id)
                done = self._drain(conn, response)
            if done:
                self._release(conn, response)
            else:
                conn.close()

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

    def cancel(self, request_id: str) -> None:
        """Stop request ``request_id`` in the ``cancel_model`` step (best effort, never raises).

        Triton 2.51 does not pass a cancelled *ensemble* request on to its composing models, so
        closing the connection alone leaves the decoupled ``llm`` model generating. The ensemble
        passes its request id (the JSON "id") on to that step, and ``llm`` accepts a control request
        holding only ``cancel_request_id``. Sent on its own short-lived connection.
        """
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=CANCEL_TIMEOUT_S)
        try:
            conn.request("POST", self._cancel_path, body=json.dumps({"cancel_request_id": request_id}),
                         headers={"Content-Type": "application/json"})
            conn.getresponse().read()
        except Exception:  # cancellation is best effort
            pass
        finally:
            conn.close()

    def _deadline(self) -> float | None:
        return None if self._timeout_s is None else time.monotonic() + self._timeout_s

    def _post(self, endpoint: str, fields: Mapping[str, Any], accept: str, deadline: float | None,
              request_id: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST the request as ``request_id``; a 200 response is returned unread, anything else
        raised (after cancelling the request if it timed out)."""
        body = json.dumps({"id": request_id, **fields}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": accept}
        path = f"{self._base}/{endpoint}"
        conn, reused = self._borrow()
        try:
            _arm(conn, deadline)  # a reused connection keeps the previous call's timeout
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
            except _STALE:
                if not reused:
                    raise
                conn.close()  # http.client reconnects on the next request
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
            if response.status != 200:
                message = error_message(response.read())
                self._release(conn, response)
                raise ScaleLLMError(message or f"HTTP {response.status} {response.reason}",
                                    status=response.status)
        except TimeoutError:
            conn.close()
            self.cancel(request_id)
            raise timed_out() from None
        except OSError as exc:  # refused, unreachable, reset
            conn.close()
            raise ScaleLLMError(f"cannot reach {self._host}:{self._port}: {exc}") from None
        return conn, response

    def _borrow(self) -> tuple[http.client.HTTPConnection, bool]:
        if self._closed:
            raise ScaleLLMError("client is closed")
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self._timeout_s), False

    def _release(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep the connection for the next call if its response was read to the end and the server
        did not ask to close it."""
        if self._closed or response.will_close or not response.isclosed():
            conn.close()
        else:
            self._idle.put(conn)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

"""Locust load test of the ensemble through scalellm_client: gRPC streaming and HTTP generate_stream users.

Each request is one locust request, ``E2E`` (ms to the last token, response length = output tokens), so the
Aggregated row and its req/s count every request once.  Its ``TTFT`` (ms to the first token) and
``per-token latency`` (mean ms between its tokens) are logged to rows of their own that the web UI and the CSV
show but that do not add to Aggregated.  Output length is fixed (``end_id=-1`` disables the end token).

Headless (16 users, 4 started per second, 60 s, CSV + HTML report):
    .venv/bin/locust -f scripts/locustfile.py GrpcStreamUser --host 127.0.0.1:8001 \\
        --headless -u 16 -r 4 -t 60s --csv build/locust --html build/locust.html
    .venv/bin/locust -f scripts/locustfile.py HttpStreamUser --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s
Web UI (then open http://127.0.0.1:8089):
    .venv/bin/locust -f scripts/locustfile.py --host 127.0.0.1:8001 --web-host 127.0.0.1

Env: SCALELLM_PROMPTS_FILE (one prompt per line; default synthetic prompts), SCALELLM_INPUT_LEN (synthetic
prompt words, default 32), SCALELLM_OUTPUT_LEN (output tokens, default 64).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, task

from scalellm_client import Client, ScaleLLMError

grpc_gevent.init_gevent()  # gRPC's C core must cooperate with locust's gevent loop

WORDS = "the of and to in is was for on that with as by at from his her they this which".split()
OUTPUT_LEN = int(os.environ.get("SCALELLM_OUTPUT_LEN", "64"))
INPUT_LEN = int(os.environ.get("SCALELLM_INPUT_LEN", "32"))


def prompts():
    path = os.environ.get("SCALELLM_PROMPTS_FILE")
    if path:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        return itertools.cycle(lines)
    return (f"Request {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(INPUT_LEN))
            for i in itertools.count())


PROMPTS = prompts()


class _StreamUser(User):
    abstract = True
    protocol = "grpc"
    wait_time = constant(0)

    def on_start(self) -> None:
        self.client = Client(self.host, protocol=self.protocol, timeout_s=600)

    def on_stop(self) -> None:
        self.client.close()

    def _report(self, name: str, ms: float, tokens: int, exception: Exception | None = None) -> None:
        """The request itself: counted in its own row and in Aggregated."""
        self.environment.events.request.fire(request_type=self.protocol, name=name, response_time=ms,
                                             response_length=tokens, exception=exception, context={})

    def _measure(self, name: str, ms: float, tokens: int) -> None:
        """A measurement of a request already reported: a row of its own, left out of Aggregated (going
        through ``events.request`` would count the request again in the totals and their req/s)."""
        self.environment.stats.get(name, self.protocol).log(ms, tokens)

    @task
    def stream(self) -> None:
        start = time.perf_counter()
        first = last = None
        tokens = 0
        try:
            for chunk in self.client.stream_chunks(next(PROMPTS), max_tokens=OUTPUT_LEN, end_id=-1):
                if chunk.num_tokens > tokens:
                    last = time.perf_counter()
                    first = first or last
                    tokens = chunk.num_tokens
        except ScaleLLMError as exc:
            self._report("E2E", (time.perf_counter() - start) * 1e3, tokens, exc)
            return
        end = time.perf_counter()
        if first is None:
            self._report("E2E", (end - start) * 1e3, 0, ScaleLLMError("no tokens generated"))
            return
        self._measure("TTFT", (first - start) * 1e3, tokens)
        if tokens > 1:
            self._measure("per-token latency", (last - first) * 1e3 / (tokens - 1), tokens)
        self._report("E2E", (end - start) * 1e3, tokens)


class GrpcStreamUser(_StreamUser):
    """gRPC streaming (``stream_infer``); --host host:port."""

    protocol = "grpc"


class HttpStreamUser(_StreamUser):
    """HTTP ``generate_stream`` (SSE); --host http://host:port."""

    protocol = "http"

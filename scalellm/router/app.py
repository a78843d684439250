"""Assemble the router (HTTP: Triton + OpenAI + /metrics; gRPC: Triton) and run it until stopped."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .config import RouterConfig
from .dispatch import Dispatcher
from .metrics import RouterMetrics
from .openai_api import OpenAIFrontDoor, error_response
from .openai_protocol import OpenAIError
from .prompt import PromptBuilder
from .replicas import DnsDiscovery, watch_health
from .slots import watch_slots
from .triton_grpc import TritonGrpc, serve_grpc
from .triton_http import TritonHttp, triton_error

log = logging.getLogger("scalellm.router")
OPEN_PATHS = ("/v2/health/", "/health", "/metrics")  # never behind the API key (probes, scrapers)


def api_key_middleware(api_key: str) -> Callable:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if not request.path.startswith(OPEN_PATHS):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                message = "missing or wrong API key: send Authorization: Bearer <key>"
                if request.path.startswith("/v1/"):
                    return error_response(OpenAIError(401, message, type_="authentication_error",
                                                      code="invalid_api_key"))
                return triton_error(401, message)
        return await handler(request)

    return check


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.prompts = PromptBuilder(config.model_dir) if config.model_dir is not None else None
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._grpc = None
        self._grpc_server = None
        self.session: aiohttp.ClientSession | None = None
        self.dispatcher: Dispatcher | None = None

    def served_model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        return self.config.model_dir.resolve().name if self.config.model_dir else self.config.model_name

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 20,
                                             auto_decompress=False)
        self.dispatcher = Dispatcher(self.config, self.session, self.metrics)
        loop = asyncio.get_running_loop()
        if self.config.replica_dns:
            discovery = DnsDiscovery(self.config.replica_dns, self.dispatcher.replicas, self.metrics, self.session)
            await discovery.refresh()
            self._tasks.append(loop.create_task(discovery.watch(self.config.dns_interval_s)))
        self._tasks.append(loop.create_task(
            watch_health(self.dispatcher.replicas, self.session, self.config.health_interval_s)))
        self._tasks.append(loop.create_task(watch_slots(self.dispatcher.slots, self.session,
                                                        self.config.cancel_model)))

        middlewares = [api_key_middleware(self.config.api_key)] if self.config.api_key else []
        app = web.Application(middlewares=middlewares, client_max_size=64 << 20)
        app.add_routes(TritonHttp(self.dispatcher).routes())
        app.add_routes(OpenAIFrontDoor(self.dispatcher, self.prompts, self.served_model_name(),
                                       self.config.default_max_tokens).routes())
        app.add_routes([web.get("/metrics", self._metrics)])
        # handler_cancellation: a client that drops its connection cancels its handler, which stops the request
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.host, self.config.http_port).start()
        if self.config.grpc_port:
            self._grpc = TritonGrpc(self.dispatcher)
            self._grpc_server = await serve_grpc(self._grpc, self.config.host, self.config.grpc_port,
                                                 self.config.api_key)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1.0)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.dispatcher is not None:
            await self.dispatcher.drain()
        if self._grpc is not None:
            await self._grpc.close()
        if self.session is not None:
            await self.session.close()


async def run_router(config: RouterConfig, started: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    router = Router(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await router.start()
    grpc_part = f"  gRPC {config.host}:{config.grpc_port}" if config.grpc_port else ""
    names = "".join(f" + every address of {name.host} (ports {name.http_port}/{name.grpc_port})"
                    for name in config.replica_dns)
    log.warning("router: HTTP http://%s:%d%s -> %d replica(s)%s, policy %s", config.host, config.http_port,
                grpc_part, len(config.replicas), names, config.policy)
    if started is not None:
        started()
    try:
        await stop.wait()
    finally:
        await router.stop()

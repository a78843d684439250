"""The ScaleLLM router: one asyncio process in front of N Triton replicas.

It forwards Triton's HTTP ``generate``/``generate_stream`` and gRPC ``ModelStreamInfer`` to the replica with
the least outstanding tokens (or the one holding the prompt's prefix) among those with a free slot, queues what
no replica has room for (bounded, with a deadline; then 429/503 + Retry-After), retries a request on another
replica when its replica fails or says busy before the first response, stops a request in the engine when its
client leaves or its time is up, and serves an OpenAI-compatible API (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health``).

    python -m scalellm.router --replica 127.0.0.1:8000:8001 --replica 127.0.0.1:8010:8011 \\
        --model-dir build/smollm2 --http-port 9000 --grpc-port 9001
"""

from .config import ReplicaAddress, RouterConfig

__all__ = ["ReplicaAddress", "RouterConfig"]

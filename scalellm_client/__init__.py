"""Thin client for ScaleLLM on Triton: sync and asyncio, gRPC and HTTP, no torch, no tokenizer.

    from scalellm_client import Client
    with Client() as llm:                      # gRPC at 127.0.0.1:8001, model "ensemble"
        print(llm.generate("What is the capital of France?", chat=True, max_tokens=32).text)

``AsyncClient`` (asyncio) is imported on first use, so synchronous users never load its libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._request import build_request
from ._types import Choice, Completion, ScaleLLMError, StreamChunk
from .chat import chatml
from .client import Client

if TYPE_CHECKING:
    from .aio import AsyncClient

__all__ = ["AsyncClient", "Choice", "Client", "Completion", "ScaleLLMError", "StreamChunk", "build_request",
           "chatml"]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

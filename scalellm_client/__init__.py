"""Thin client for ScaleLLM on Triton: sync and asyncio, gRPC and HTTP, no torch, no tokenizer.

    from scalellm_client import Client
    with Client() as llm:                      # gRPC at 127.0.0.1:8001, model "ensemble"
        print(llm.generate("What is the capital of France?", max_tokens=32).text)
"""

from ._request import build_request
from ._types import Completion, ScaleLLMError, StreamChunk
from .aio import AsyncClient
from .chat import chatml
from .client import Client

__all__ = ["AsyncClient", "Client", "Completion", "ScaleLLMError", "StreamChunk", "build_request", "chatml"]

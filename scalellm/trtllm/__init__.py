"""The GPU path: TensorRT-LLM engines (or its LLM API) behind our preprocessing/postprocessing ensemble.

Everything here imports without TensorRT-LLM; the modules that need it (``build``, and the Triton model in
``model_repository_gpu/tensorrt_llm_pytorch``) import it lazily through ``require`` and say what is missing.

Pinned: TensorRT-LLM ``PINNED_TRTLLM_VERSION`` in NVIDIA's ``PINNED_IMAGE``: the last release pairing whose
Triton templates live in triton-inference-server/tensorrtllm_backend (branch r25.05) and that still ships the
TensorRT engine flow (``trtllm-build`` / ``tensorrt_llm.build``). See docs/gpu.md.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PINNED_TRTLLM_VERSION = "0.19.0"
PINNED_TRITON_RELEASE = "25.05"
PINNED_IMAGE = f"nvcr.io/nvidia/tritonserver:{PINNED_TRITON_RELEASE}-trtllm-python-py3"
BACKENDS = ("tensorrt_llm", "tensorrt_llm_pytorch")


class TrtllmUnavailable(RuntimeError):
    """TensorRT-LLM (or a module it needs) cannot be imported here."""


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``tensorrt_llm``) or raise TrtllmUnavailable saying what is missing and where
    to get it (``import tensorrt_llm`` also fails without CUDA libraries, so the cause is passed on)."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or OSError/RuntimeError from missing CUDA libraries
        raise TrtllmUnavailable(
            f"cannot import {module} ({type(error).__name__}: {error}). The TensorRT-LLM backends need a CUDA "
            f"GPU and TensorRT-LLM {PINNED_TRTLLM_VERSION}: run this inside {PINNED_IMAGE} (docs/gpu.md), or "
            f"`pip install tensorrt_llm=={PINNED_TRTLLM_VERSION} --extra-index-url https://pypi.nvidia.com` on a "
            "CUDA machine. To only render the model repository here, pass --render-only."
        ) from error

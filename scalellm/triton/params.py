"""The ``llm`` model's ``parameters`` <-> :class:`EngineConfig`; the defaults live once, in ``scalellm/config.py``.

``build_engines.py`` fills the template's ``${kv_block_size}``-style placeholders with :func:`default_parameters`
(``--param NAME=VALUE`` overrides any of them); the model turns the strings back with :func:`engine_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig, StreamConfig
from scalellm.models.engine_meta import EngineMeta

_CACHE, _SCHED = CacheConfig(), SchedulerConfig()
# parameter name -> default (None: unset)
ENGINE_PARAMETERS: dict[str, Any] = {
    "device": EngineConfig.device,
    "kv_block_size": _CACHE.block_size,
    "kv_cache_blocks": _CACHE.num_blocks,
    "kv_cache_memory_bytes": _CACHE.memory_bytes,
    "max_num_seqs": _SCHED.max_num_seqs,
    "max_num_batched_tokens": _SCHED.max_num_batched_tokens,
    "num_threads": 0,  # 0: torch's default
    "unquantized_prompts": int(EngineConfig.unquantized_prompts),  # int8/int4: 1 = prompt tokens unquantised
    "cpu_kernels": int(EngineConfig.cpu_kernels),  # 1 = our CPU kernels where they build, 0 = torch's
    "max_queue_size": _SCHED.max_queue_size,  # None: sized from the KV cache (scalellm/engine/admission.py)
    "default_timeout_ms": 0,  # deadline of requests without timeout_ms; 0: none
    "worker_nice": EngineConfig.worker_nice,  # nice of the engine's worker threads (0: unchanged)
    "stream_interval": StreamConfig.stream_interval,  # streaming: a response every this many tokens (pacing.py)
}


def default_parameters() -> dict[str, str]:
    """Template values for the engine parameters ("" for unset)."""
    return {name: "" if value is None else str(value) for name, value in ENGINE_PARAMETERS.items()}


def _int(params: dict[str, str], name: str) -> int | None:
    value = params.get(name, "")
    if value == "":
        return ENGINE_PARAMETERS[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"llm parameter {name} must be an integer (got {value!r})") from None


def default_timeout_ms(params: dict[str, str]) -> int:
    return _int(params, "default_timeout_ms") or 0


def stream_config(params: dict[str, str]) -> StreamConfig:
    interval = _int(params, "stream_interval")
    if interval < 1:
        raise ValueError(f"llm parameter stream_interval must be >= 1 (got {interval})")
    return StreamConfig(stream_interval=interval)


def engine_config(params: dict[str, str], engine_dir: Path, meta: EngineMeta) -> EngineConfig:
    """The engine's configuration from the model's parameters and the engine directory's metadata."""
    return EngineConfig(
        engine_dir=str(engine_dir),
        device=params.get("device") or EngineConfig.device,
        dtype=meta.dtype or EngineConfig.dtype,
        cache=CacheConfig(
            block_size=_int(params, "kv_block_size"),
            num_blocks=_int(params, "kv_cache_blocks"),
            memory_bytes=_int(params, "kv_cache_memory_bytes"),
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=_int(params, "max_num_seqs"),
            max_num_batched_tokens=_int(params, "max_num_batched_tokens"),
            max_model_len=meta.max_model_len or _SCHED.max_model_len,
            max_queue_size=_int(params, "max_queue_size"),
        ),
        num_threads=_int(params, "num_threads") or None,
        unquantized_prompts=bool(_int(params, "unquantized_prompts")),
        cpu_kernels=bool(_int(params, "cpu_kernels")),
        worker_nice=_int(params, "worker_nice") or 0,
    )

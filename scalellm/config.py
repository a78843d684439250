"""Configuration: one dataclass per concern."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Tokens generated when a request gives no max_tokens: vLLM's and OpenAI's completions default.
DEFAULT_MAX_TOKENS = 16


def read_hf_config(directory: str | Path) -> dict:
    """A Hugging Face directory's (or an engine directory's) ``config.json``."""
    return json.loads((Path(directory) / "config.json").read_text())


def hf_eos_token_ids(hf: dict) -> tuple[int, ...]:
    """A Hugging Face ``config.json``'s end tokens (``eos_token_id``: one id, a list of them, or none)."""
    eos = hf.get("eos_token_id")
    return tuple(int(t) for t in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, read from a Hugging Face ``config.json`` (Llama, Mistral, Mixtral)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    num_experts: int = 0  # 0 = dense MLP
    num_experts_per_tok: int = 0

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported yet")
        heads = hf["num_attention_heads"]
        return cls(
            architecture=(hf.get("model_type") or "llama"),
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=hf_eos_token_ids(hf),
            num_experts=hf.get("num_local_experts", 0) or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) or 0,
        )

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path) -> ModelConfig:
        return cls.from_hf(read_hf_config(engine_dir))


@dataclass
class CacheConfig:
    """Paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots each.

    Give ``num_blocks`` directly, or a memory budget: ``memory_fraction`` of the memory available when the
    engine starts, else ``memory_bytes``.  Full blocks are shared between requests with a common prefix.
    """

    # 64: a decode step reads each sequence's keys and values block by block, and once a server has run a while its
    # sequences' blocks are scattered over the cache (freed blocks are reused in the order they were freed). At 16
    # tokens a block (2 KB of a head's keys) the reads lost their streaming: attention over 64 sequences took 1.5x
    # as long on a shuffled cache, the engine 0.9x the tokens/s; at 64, 1.16x and the same tokens/s. vLLM's CPU
    # backend uses 128 for the same reason. Prefix-cache hits come in whole blocks.
    block_size: int = 64
    num_blocks: int | None = None
    memory_bytes: int = 1 << 30
    memory_fraction: float | None = None
    prefix_caching: bool = True
    # "auto": float16 where quantised weights run on float32 activations on our kernels (decode attention reads
    # the whole cache each step and is memory-bound there: float16 halves it, as llama.cpp's default f16 cache
    # does); the activations' dtype everywhere else (the float32 format keeps float32's parity). "activations":
    # always the activations' dtype.
    kv_cache_dtype: str = "auto"


@dataclass
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # prefill chunks + decodes per step
    max_model_len: int = 2048  # prompt + output tokens of one sequence
    # waiting requests admitted beyond max_num_seqs before new ones get "server busy";
    # None = sized from the KV cache (scalellm.engine.admission.default_queue_size)
    max_queue_size: int | None = None


@dataclass
class EngineConfig:
    """``dtype`` float32 | bfloat16 | float16 | auto and ``quantize`` none | int8 | int4 pick the weight format
    (scalellm/models/formats.py); ``quantize=None`` takes the engine directory's recorded one when the dtype is
    auto or bfloat16 (an explicit float32 loads the float32 reference weights)."""

    engine_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str | None = None
    # Quantised formats: prompt tokens multiply the weights by unquantised activations (bf16 or float32), generated
    # tokens by int8-quantised ones (memory-bound: the weights' bytes are what a token costs). A token's path
    # depends only on whether it is a prompt token, so batching never changes a result, and a prompt's first token
    # is picked without int8 activation noise (it moved "The capital of France is Paris" to another answer).
    # False = every token as a generated one (scalellm/models/linear.py).
    unquantized_prompts: bool = True
    # Our CPU kernels where the CPU and a compiler allow (scalellm/models/kernels): every matmul and the layers'
    # other operations, each computing a row the same whatever it is batched with, on every CPU. False, or no
    # kernels = torch's (correct, slower, not batch-invariant by construction). On a CPU without native bf16,
    # ``auto`` runs quantised weights only on our kernels.
    cpu_kernels: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    # Nice value of the engine's worker threads (our kernels' team, scalellm/models/kernels/team.h, and torch's
    # OpenMP workers; the engine thread itself keeps its own), where our CPU kernels load. A server's cores are
    # shared with Triton's threads, which each streamed token wakes: at nice 19 those threads take a worker's
    # core rather than the engine thread's, and the engine thread computes whatever work the preempted worker
    # has not taken, never waiting for a worker that has not started. 0: leave them be.
    worker_nice: int = 19


@dataclass(frozen=True)
class StreamConfig:
    """How the ``llm`` model paces a streamed request's responses (``scalellm/triton/pacing.py``).

    The first token goes out alone at once and the last always; in between, a response every
    ``stream_interval`` tokens (vLLM's, SGLang's and TensorRT-LLM's name), and whatever is pending as one
    response whenever the responses fall behind. A request's own ``stream_interval`` overrides this default.
    """

    stream_interval: int = 1

"""Our build flags -> the arguments of TensorRT-LLM's ``Mapping``, ``QuantConfig``, ``BuildConfig`` and ``LLM``.

Pure data, no TensorRT-LLM import: the mapping and every refusal are unit-tested on machines without a GPU.
The names on the right are TensorRT-LLM's (``tensorrt_llm.Mapping(world_size, rank, tp_size, pp_size,
moe_tp_size, moe_ep_size)``, ``QuantConfig(quant_algo=QuantAlgo.<name>)``, ``BuildConfig(max_batch_size,
max_input_len, max_seq_len, max_num_tokens, max_beam_width, plugin_config=...)``, the LLM API's
``tensor_parallel_size`` / ``moe_expert_parallel_size`` / ...); ``build.py`` turns them into the real objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalellm.trtllm import BACKENDS

# Hugging Face architectures that TensorRT-LLM converts through its Llama path (LLaMAForCausalLM).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
QUANTIZE_CHOICES = ("none", "int8", "int4", "fp8")
# Weight-only int8/int4 need no calibration; FP8 is calibrated through TensorRT-LLM's ModelOpt path.
QUANT_ALGO = {"none": None, "int8": "W8A16", "int4": "W4A16", "fp8": "FP8"}
DTYPES = ("auto", "float16", "bfloat16", "float32")


class OptionError(ValueError):
    """A flag (or a combination of flags) that cannot build; the message names the flag and the bound."""


@dataclass(frozen=True)
class TrtllmOptions:
    """What ``build_engines.py --backend tensorrt_llm|tensorrt_llm_pytorch`` was asked for."""

    backend: str = "tensorrt_llm"
    dtype: str = "auto"
    tp_size: int = 1
    moe_tp_size: int | None = None  # None: as TensorRT-LLM, tp_size // moe_ep_size (tensor-parallel experts)
    moe_ep_size: int | None = None  # None: tp_size // moe_tp_size, i.e. 1 when neither is given
    quantize: str = "none"
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    max_seq_len: int | None = None  # None: the checkpoint's max_position_embeddings
    calib_dataset: str = "cnn_dailymail"  # FP8 only
    calib_size: int = 512  # FP8 only

    def moe_sizes(self) -> tuple[int, int]:
        """(moe_tp_size, moe_ep_size), filled in the way TensorRT-LLM's Mapping fills them."""
        tp, moe_tp, moe_ep = self.tp_size, self.moe_tp_size, self.moe_ep_size
        if moe_tp is None and moe_ep is None:
            return tp, 1
        if moe_tp is None:
            assert moe_ep is not None
            if tp % moe_ep:
                raise OptionError(f"--moe-ep-size {moe_ep} must divide --tp-size {tp}")
            return tp // moe_ep, moe_ep
        if moe_ep is None:
            if tp % moe_tp:
                raise OptionError(f"--moe-tp-size {moe_tp} must divide --tp-size {tp}")
            return moe_tp, tp // moe_tp
        if moe_tp * moe_ep != tp:
            raise OptionError(
                f"--moe-tp-size × --moe-ep-size must equal --tp-size: {moe_tp} × {moe_ep} = {moe_tp * moe_ep} "
                f"!= {tp} (the experts of one layer are split over the same {tp} GPUs as the attention)"
            )
        return moe_tp, moe_ep

    def validate(self, hf_config: dict[str, Any]) -> None:
        """Refuse what cannot build for this checkpoint, before minutes go into a conversion."""
        if self.backend not in BACKENDS:
            raise OptionError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype must be one of {', '.join(DTYPES)} for --backend {self.backend}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise OptionError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)} (got {self.quantize!r})")
        for flag, value in (("--tp-size", self.tp_size), ("--max-batch-size", self.max_batch_size),
                            ("--max-num-tokens", self.max_num_tokens), ("--calib-size", self.calib_size)):
            if value < 1:
                raise OptionError(f"{flag} must be >= 1 (got {value})")
        for flag, value in (("--moe-tp-size", self.moe_tp_size), ("--moe-ep-size", self.moe_ep_size)):
            if value is not None and value < 1:
                raise OptionError(f"{flag} must be >= 1 (got {value})")
        architectures = hf_config.get("architectures") or []
        if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            raise OptionError(
                f"checkpoint architecture {architectures or hf_config.get('model_type')} is not supported by "
                f"--backend {self.backend}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._validate_parallelism(hf_config)
        self._validate_lengths(hf_config)
        if self.quantize != "none" and self.backend == "tensorrt_llm_pytorch":
            raise OptionError(
                f"--quantize {self.quantize} is for --backend tensorrt_llm; the LLM API's PyTorch backend reads "
                "quantisation from a pre-quantised checkpoint (e.g. a ModelOpt FP8 export): pass that as "
                "--checkpoint with --quantize none"
            )
        if self.quantize == "fp8" and self.dtype == "float32":
            raise OptionError("--quantize fp8 needs --dtype float16, bfloat16 or auto (FP8 GEMMs take 16-bit "
                              "activations), not float32")

    def _validate_parallelism(self, hf_config: dict[str, Any]) -> None:
        experts = int(hf_config.get("num_local_experts") or 0)
        if not experts and (self.moe_tp_size is not None or self.moe_ep_size is not None):
            raise OptionError("--moe-tp-size / --moe-ep-size need a MoE checkpoint (num_local_experts > 0); "
                              f"this one ({hf_config.get('model_type')}) is dense")
        moe_tp, moe_ep = self.moe_sizes()
        heads = int(hf_config["num_attention_heads"])
        kv_heads = int(hf_config.get("num_key_value_heads") or heads)
        if heads % self.tp_size:
            raise OptionError(f"--tp-size {self.tp_size} must divide num_attention_heads {heads}")
        if kv_heads % self.tp_size and self.tp_size % kv_heads:
            raise OptionError(f"--tp-size {self.tp_size} and num_key_value_heads {kv_heads}: one must divide "
                              "the other (KV heads are split, or replicated, across the tensor-parallel GPUs)")
        if experts:
            if experts % moe_ep:
                raise OptionError(f"--moe-ep-size {moe_ep} must divide num_local_experts {experts} "
                                  "(each GPU holds the same number of whole experts)")
            inter = int(hf_config["intermediate_size"])
            if inter % moe_tp:
                raise OptionError(f"--moe-tp-size {moe_tp} must divide the experts' intermediate_size {inter}")

    def _validate_lengths(self, hf_config: dict[str, Any]) -> None:
        limit = hf_config.get("max_position_embeddings")
        if self.max_seq_len is not None:
            if self.max_seq_len < 2:
                raise OptionError(f"--max-seq-len must be >= 2 (got {self.max_seq_len}): one prompt token and "
                                  "one generated token")
            if limit is not None and self.max_seq_len > limit:
                raise OptionError(f"--max-seq-len {self.max_seq_len} exceeds the checkpoint's "
                                  f"max_position_embeddings {limit}")

    def resolved_max_seq_len(self, hf_config: dict[str, Any]) -> int:
        return int(self.max_seq_len or hf_config.get("max_position_embeddings") or 2048)

    @property
    def world_size(self) -> int:
        return self.tp_size  # pipeline parallelism is not offered: pp_size = 1

    def mapping_kwargs(self, rank: int) -> dict[str, int]:
        """``tensorrt_llm.Mapping(**kwargs)`` for one rank."""
        if not 0 <= rank < self.world_size:
            raise OptionError(f"rank must be in [0, {self.world_size}) (got {rank})")
        moe_tp, moe_ep = self.moe_sizes()
        return {"world_size": self.world_size, "rank": rank, "tp_size": self.tp_size, "pp_size": 1,
                "moe_tp_size": moe_tp, "moe_ep_size": moe_ep}

    def quant_config_kwargs(self) -> dict[str, Any]:
        """``QuantConfig(**kwargs)``, with ``quant_algo`` as the name of a ``QuantAlgo`` member (or absent)."""
        algo = QUANT_ALGO[self.quantize]
        return {} if algo is None else {"quant_algo": algo}

    @property
    def needs_calibration(self) -> bool:
        """FP8 goes through ``LLaMAForCausalLM.quantize`` (ModelOpt calibration), not ``from_hugging_face``."""
        return self.quantize == "fp8"

    def plugin_config_kwargs(self) -> dict[str, Any]:
        """What ``trtllm-build`` is told for an in-flight-batching engine: plugins at the model's dtype, paged KV
        cache, packed (padding-free) inputs, fused context attention that also reads the paged cache (needed for
        chunked context and KV reuse)."""
        return {"gpt_attention_plugin": "auto", "gemm_plugin": "auto", "moe_plugin": "auto",
                "paged_kv_cache": True, "remove_input_padding": True, "context_fmha": True,
                "use_paged_context_fmha": True}

    def build_config_kwargs(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """``tensorrt_llm.BuildConfig(**kwargs)`` (plugin_config separately: ``plugin_config_kwargs``)."""
        max_seq_len = self.resolved_max_seq_len(hf_config)
        return {"max_batch_size": self.max_batch_size, "max_input_len": max_seq_len - 1,
                "max_seq_len": max_seq_len, "max_num_tokens": self.max_num_tokens, "max_beam_width": 1}

    def trtllm_build_command(self, checkpoint_dir: str, engine_dir: str, hf_config: dict[str, Any]) -> list[str]:
        """The ``trtllm-build`` command line equivalent to our Python-API build (printed in logs and docs)."""
        build = self.build_config_kwargs(hf_config)
        plugin = self.plugin_config_kwargs()
        flag = {True: "enable", False: "disable"}
        return [
            "trtllm-build", f"--checkpoint_dir={checkpoint_dir}", f"--output_dir={engine_dir}",
            f"--max_batch_size={build['max_batch_size']}", f"--max_input_len={build['max_input_len']}",
            f"--max_seq_len={build['max_seq_len']}", f"--max_num_tokens={build['max_num_tokens']}",
            f"--max_beam_width={build['max_beam_width']}", "--kv_cache_type=paged",
            f"--gpt_attention_plugin={plugin['gpt_attention_plugin']}", f"--gemm_plugin={plugin['gemm_plugin']}",
            f"--moe_plugin={plugin['moe_plugin']}", f"--remove_input_padding={flag[plugin['remove_input_padding']]}",
            f"--context_fmha={flag[plugin['context_fmha']]}",
            f"--use_paged_context_fmha={flag[plugin['use_paged_context_fmha']]}", f"--workers={self.world_size}",
        ]

    def llm_api_args(self, model: str, hf_config: dict[str, Any], kv_cache_free_gpu_mem_fraction: float,
                     enable_kv_cache_reuse: bool) -> dict[str, Any]:
        """The ``LLM(**kwargs)`` of the LLM API's PyTorch backend (the keys of the llmapi model's model.yaml)."""
        moe_tp, moe_ep = self.moe_sizes()
        args: dict[str, Any] = {
            "model": model,
            "backend": "pytorch",
            "tensor_parallel_size": self.tp_size,
            "pipeline_parallel_size": 1,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.resolved_max_seq_len(hf_config),
            "kv_cache_config": {"free_gpu_memory_fraction": kv_cache_free_gpu_mem_fraction,
                                "enable_block_reuse": enable_kv_cache_reuse},
        }
        if self.dtype != "auto":
            args["dtype"] = self.dtype
        if hf_config.get("num_local_experts"):
            args["moe_tensor_parallel_size"] = moe_tp
            args["moe_expert_parallel_size"] = moe_ep
        return args

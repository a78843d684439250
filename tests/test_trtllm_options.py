"""Our build flags -> TensorRT-LLM's Mapping / QuantConfig / BuildConfig / LLM arguments, and the refusals.

No TensorRT-LLM here: the arguments are checked as data against what TensorRT-LLM's API takes.
"""

from __future__ import annotations

import pytest

from scalellm.trtllm.options import OptionError, TrtllmOptions

# Mixtral-8x7B's config.json (the numbers that matter for splitting it).
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768}
LLAMA_DENSE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
               "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
               "max_position_embeddings": 8192}


def test_single_gpu_defaults_map_to_one_rank_without_expert_parallelism() -> None:
    options = TrtllmOptions()
    options.validate(MIXTRAL_8X7B)
    assert options.mapping_kwargs(0) == {"world_size": 1, "rank": 0, "tp_size": 1, "pp_size": 1,
                                         "moe_tp_size": 1, "moe_ep_size": 1}
    assert options.quant_config_kwargs() == {}


@pytest.mark.parametrize(("tp", "moe_tp", "moe_ep", "expected"), [
    (4, None, None, (4, 1)),  # TensorRT-LLM's default: experts tensor-parallel
    (4, None, 4, (1, 4)),  # pure expert parallelism: 2 whole experts per GPU
    (4, 2, None, (2, 2)),
    (8, 2, 4, (2, 4)),
])
def test_moe_sizes_fill_in_like_tensorrt_llm(tp: int, moe_tp: int | None, moe_ep: int | None,
                                             expected: tuple[int, int]) -> None:
    options = TrtllmOptions(tp_size=tp, moe_tp_size=moe_tp, moe_ep_size=moe_ep)
    options.validate(MIXTRAL_8X7B)
    for rank in range(tp):
        mapping = options.mapping_kwargs(rank)
        assert (mapping["moe_tp_size"], mapping["moe_ep_size"]) == expected
        assert mapping["moe_tp_size"] * mapping["moe_ep_size"] == mapping["tp_size"] == mapping["world_size"] == tp
        assert mapping["rank"] == rank


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tp_size": 4, "moe_tp_size": 2, "moe_ep_size": 4}, "--moe-tp-size × --moe-ep-size must equal --tp-size: "
                                                         "2 × 4 = 8 != 4"),
    ({"tp_size": 4, "moe_ep_size": 3}, "--moe-ep-size 3 must divide --tp-size 4"),
    ({"tp_size": 4, "moe_tp_size": 3}, "--moe-tp-size 3 must divide --tp-size 4"),
    ({"tp_size": 16, "moe_ep_size": 16}, "--moe-ep-size 16 must divide num_local_experts 8"),
    ({"tp_size": 3}, "--tp-size 3 must divide num_attention_heads 32"),
    ({"tp_size": 0}, "--tp-size must be >= 1 (got 0)"),
    ({"moe_ep_size": 0}, "--moe-ep-size must be >= 1 (got 0)"),
    ({"max_batch_size": 0}, "--max-batch-size must be >= 1 (got 0)"),
    ({"max_num_tokens": 0}, "--max-num-tokens must be >= 1 (got 0)"),
    ({"max_seq_len": 65536}, "--max-seq-len 65536 exceeds the checkpoint's max_position_embeddings 32768"),
    ({"max_seq_len": 1}, "--max-seq-len must be >= 2 (got 1)"),
    ({"quantize": "int3"}, "--quantize must be one of none, int8, int4, fp8 (got 'int3')"),
    ({"quantize": "fp8", "dtype": "float32"}, "--quantize fp8 needs --dtype float16, bfloat16 or auto"),
    ({"backend": "tensorrt_llm_pytorch", "quantize": "int8"}, "--quantize int8 is for --backend tensorrt_llm"),
    ({"backend": "vllm"}, "--backend must be one of tensorrt_llm, tensorrt_llm_pytorch (got 'vllm')"),
    ({"dtype": "int8"}, "--dtype must be one of auto, float16, bfloat16, float32"),
])
def test_invalid_combinations_are_refused_with_the_flag_and_the_bound(kwargs: dict, message: str) -> None:
    with pytest.raises(OptionError) as error:
        TrtllmOptions(**kwargs).validate(MIXTRAL_8X7B)
    assert message in str(error.value)


def test_moe_flags_on_a_dense_checkpoint_are_refused() -> None:
    with pytest.raises(OptionError, match="need a MoE checkpoint"):
        TrtllmOptions(tp_size=1, moe_ep_size=1).validate(LLAMA_DENSE)
    TrtllmOptions(tp_size=3).validate(LLAMA_DENSE)  # 9 heads, 3 KV heads: tp 3 splits both


def test_kv_heads_must_split_or_replicate_evenly() -> None:
    with pytest.raises(OptionError, match="--tp-size 9 and num_key_value_heads 6: one must divide the other"):
        TrtllmOptions(tp_size=9).validate(LLAMA_DENSE | {"num_attention_heads": 18, "num_key_value_heads": 6})
    TrtllmOptions(tp_size=6).validate(LLAMA_DENSE | {"num_attention_heads": 18, "num_key_value_heads": 3})


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(OptionError, match="supported: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM"):
        TrtllmOptions().validate({**LLAMA_DENSE, "architectures": ["GPT2LMHeadModel"]})


@pytest.mark.parametrize(("quantize", "algo", "calibrate"),
                         [("none", None, False), ("int8", "W8A16", False), ("int4", "W4A16", False),
                          ("fp8", "FP8", True)])
def test_quantize_maps_to_quant_algo_names(quantize: str, algo: str | None, calibrate: bool) -> None:
    options = TrtllmOptions(quantize=quantize)
    options.validate(MIXTRAL_8X7B)
    assert options.quant_config_kwargs() == ({} if algo is None else {"quant_algo": algo})
    assert options.needs_calibration is calibrate


def test_build_config_is_an_in_flight_batching_engine() -> None:
    options = TrtllmOptions(max_batch_size=128, max_num_tokens=4096, max_seq_len=8192)
    options.validate(MIXTRAL_8X7B)
    assert options.build_config_kwargs(MIXTRAL_8X7B) == {"max_batch_size": 128, "max_input_len": 8191,
                                                         "max_seq_len": 8192, "max_num_tokens": 4096,
                                                         "max_beam_width": 1}
    plugin = options.plugin_config_kwargs()
    assert plugin["paged_kv_cache"] and plugin["use_paged_context_fmha"] and plugin["remove_input_padding"]
    assert plugin["gpt_attention_plugin"] == plugin["gemm_plugin"] == plugin["moe_plugin"] == "auto"
    # default max_seq_len: the checkpoint's context
    assert TrtllmOptions().build_config_kwargs(MIXTRAL_8X7B)["max_seq_len"] == 32768


def test_trtllm_build_equivalent_command_carries_the_same_limits() -> None:
    options = TrtllmOptions(tp_size=2, max_batch_size=32, max_num_tokens=2048, max_seq_len=4096)
    command = options.trtllm_build_command("ckpt", "engine", MIXTRAL_8X7B)
    assert command[0] == "trtllm-build"
    for flag in ("--checkpoint_dir=ckpt", "--output_dir=engine", "--max_batch_size=32", "--max_input_len=4095",
                 "--max_seq_len=4096", "--max_num_tokens=2048", "--kv_cache_type=paged",
                 "--use_paged_context_fmha=enable", "--workers=2"):
        assert flag in command


def test_llm_api_arguments_for_mixtral_carry_expert_parallelism() -> None:
    options = TrtllmOptions(backend="tensorrt_llm_pytorch", dtype="bfloat16", tp_size=4, moe_ep_size=4)
    options.validate(MIXTRAL_8X7B)
    args = options.llm_api_args("/models/mixtral", MIXTRAL_8X7B, 0.85, True)
    assert args == {"model": "/models/mixtral", "backend": "pytorch", "tensor_parallel_size": 4,
                    "pipeline_parallel_size": 1, "max_batch_size": 64, "max_num_tokens": 8192,
                    "max_seq_len": 32768, "kv_cache_config": {"free_gpu_memory_fraction": 0.85,
                                                              "enable_block_reuse": True},
                    "dtype": "bfloat16", "moe_tensor_parallel_size": 1, "moe_expert_parallel_size": 4}
    dense = TrtllmOptions(backend="tensorrt_llm_pytorch").llm_api_args("m", LLAMA_DENSE, 0.9, False)
    assert "moe_expert_parallel_size" not in dense and "dtype" not in dense


def test_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(OptionError, match=r"rank must be in \[0, 2\) \(got 2\)"):
        TrtllmOptions(tp_size=2).mapping_kwargs(2)

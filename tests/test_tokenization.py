"""Windowed incremental detokenisation with the real SmolLM2 tokenizer: streamed deltas == one-shot decode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scalellm.tokenization import (
    decode_delta,
    detokenize_window,
    encode_word_list,
    flatten_word_ids,
    load_tokenizer,
    unflatten_word_ids,
)

ROOT = Path(__file__).resolve().parents[1]
ENGINE_DIR = Path(os.environ.get("SCALELLM_TEST_MODEL_DIR", ROOT / "build" / "smollm2")) / "engine"

TRICKY = [
    "Hello world, with  double  spaces and\nnew lines.",
    "café crème brûlée — naïve façade",
    "你好，世界！这是一个测试。",
    "日本語のテキストです",
    "Emoji: 🎉🚀👍🏽 and flags 🇫🇷🇯🇵",
    "Mixed: a😀b 한국어 Ωμέγα\ttab",
]


@pytest.fixture(scope="module")
def tokenizer():
    if not (ENGINE_DIR / "tokenizer.json").exists():
        pytest.fail(f"no engine at {ENGINE_DIR}: run scripts/test.sh (it builds the default engine)")
    return load_tokenizer(ENGINE_DIR)


def stream_text(tokenizer, token_ids: list[int], prompt_len: int, step: int) -> str:
    """Replay the llm model's windows the way a stream of ``step`` tokens per response would."""
    text, sent = [], prompt_len
    ends = list(range(prompt_len + step, len(token_ids), step)) + [len(token_ids)]
    for end in ends:
        window, read_offset = detokenize_window(token_ids[:end], sent)
        text.append(decode_delta(tokenizer, window, read_offset, final=end == len(token_ids)))
        sent = end
    return "".join(text)


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_deltas_equal_one_shot_decode(tokenizer, text, step):
    prompt = tokenizer.encode("Say:").ids
    output = tokenizer.encode(" " + text, add_special_tokens=False).ids
    one_shot = decode_delta(tokenizer, *detokenize_window(prompt + output, len(prompt)), final=True)
    assert one_shot == " " + text  # the leading space of the first output token survives
    assert stream_text(tokenizer, prompt + output, len(prompt), step) == one_shot


def test_incomplete_utf8_is_held_back_not_replaced(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False).ids
    assert len(ids) > 1  # byte-level BPE splits the emoji
    partial = decode_delta(tokenizer, ids[:1], 0, final=False)
    assert "\ufffd" not in partial


def test_stop_word_variants_and_flat_layout(tokenizer):
    seqs = encode_word_list(tokenizer, ["Paris", ""])
    assert tuple(tokenizer.encode(" Paris", add_special_tokens=False).ids) in seqs
    assert unflatten_word_ids(*flatten_word_ids(seqs)) == seqs

"""Incremental detokenisation with context with the real SmolLM2 tokenizer: streamed deltas == one-shot decode."""

from __future__ import annotations

import pytest
from conftest import ENGINE_DIR, require_engine

from scalellm.tokenization import (
    ChatTemplate,
    context_tail,
    decode_delta,
    encode_word_list,
    flatten_word_ids,
    load_tokenizer,
    unflatten_word_ids,
)

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
    require_engine()
    return load_tokenizer(ENGINE_DIR)


def stream_text(tokenizer, token_ids: list[int], prompt_len: int, step: int) -> str:
    """Replay what the llm model sends when it streams ``step`` new tokens per response, with context."""
    text, shown = [], context_tail(token_ids[:prompt_len], [])
    for start in range(prompt_len, len(token_ids), step):
        new = token_ids[start:start + step]
        final = start + step >= len(token_ids)
        text.append(decode_delta(tokenizer, shown + new, len(shown), final))
        shown = context_tail(shown, new)
    return "".join(text)


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_deltas_equal_one_shot_decode(tokenizer, text, step):
    prompt = tokenizer.encode("Say:").ids
    output = tokenizer.encode(" " + text, add_special_tokens=False).ids
    one_shot = decode_delta(tokenizer, prompt + output, len(prompt), final=True)
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
    assert unflatten_word_ids([5, 7, 8, 9, 0], [1, 4, -1, -1, -1]) == [(5,), (7, 8, 9)]  # -1 pads the offsets
    for offsets in ([3, 1, -1], [1, 6, -1]):  # falling, or past the ids: an error, never words silently lost
        with pytest.raises(ValueError, match="offsets must rise"):
            unflatten_word_ids([5, 7, 8], offsets)


@pytest.mark.parametrize("text", ["What is the capital of France?", "  spaced  \n", "{{ not jinja }} é 🎉"])
def test_chat_template_matches_transformers(text):
    """Preprocessing renders the model's template with jinja2 (transformers cannot load in the Triton stub);
    it must give exactly transformers' apply_chat_template text."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(ENGINE_DIR))
    expected = reference.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    assert ChatTemplate(ENGINE_DIR).user_prompt(text) == expected


def test_chat_template_matches_transformers_on_a_conversation():
    """The router's /v1/chat/completions renders whole conversations with the same ChatTemplate."""
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}]
    expected = AutoTokenizer.from_pretrained(str(ENGINE_DIR)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(ENGINE_DIR).render(messages) == expected

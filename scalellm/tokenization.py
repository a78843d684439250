"""Tokenizer loading, stop/bad-word encoding and windowed incremental detokenisation.

Streaming detokenisation is stateless per response, which suits Triton's per-response postprocessing
step: with a response's new tokens the ``llm`` model sends ``context_ids``, the last few tokens already
shown.  The delta is ``decode(context + new)[len(decode(context)):]``; an incomplete UTF-8 tail (U+FFFD)
is held back until the bytes that complete it arrive (they are then part of the next context).
Decoding with context (not token by token) keeps SentencePiece / BPE leading spaces, and the
concatenated deltas equal the one-shot decode byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
DETOKENIZE_WINDOW = 8  # tokens of already-delivered context; >= the bytes of any UTF-8 character


def load_tokenizer(engine_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(engine_dir) / "tokenizer.json"))


class ChatTemplate:
    """The model's own chat template (``tokenizer_config.json``), rendered with jinja2 as transformers renders it.

    transformers itself cannot be imported inside Triton's Python stub (its ``_ssl`` import fails against the
    stub's libpython), so this uses the library transformers uses, with transformers' settings: a sandboxed,
    immutable environment with ``trim_blocks``/``lstrip_blocks``; tests check it against
    ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``.
    """

    def __init__(self, engine_dir: str | Path) -> None:
        path = Path(engine_dir) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        self.special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token",
                                                                      "unk_token")}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self.template = None
        if source:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = _raise
            self.template = env.from_string(source)

    @property
    def available(self) -> bool:
        return self.template is not None

    def render(self, messages: list[dict]) -> str:
        """Chat ``messages`` followed by the assistant's turn (``add_generation_prompt``)."""
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)

    def user_prompt(self, text: str) -> str:
        """``text`` as one user message, followed by the assistant's turn."""
        return self.render([{"role": "user", "content": text}])


def _token_text(token: object) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def decode_delta(tokenizer: Tokenizer, window: list[int], read_offset: int, final: bool) -> str:
    """Text that ``window[read_offset:]`` adds after ``window[:read_offset]`` (see module doc)."""
    done = tokenizer.decode(window[:read_offset], skip_special_tokens=True).rstrip(REPLACEMENT)
    text = tokenizer.decode(window, skip_special_tokens=True)
    if not final:
        text = text.rstrip(REPLACEMENT)
    return text[len(done):] if len(text) > len(done) else ""


def context_tail(shown: list[int], new: list[int]) -> list[int]:
    """The last ``DETOKENIZE_WINDOW`` tokens of ``shown + new``: the next response's detokenisation context."""
    return (shown + new)[-DETOKENIZE_WINDOW:]


def encode_word_list(tokenizer: Tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """Token sequences for stop/bad words: each word as written and with a leading space, since
    BPE vocabularies spell a word differently after a space ("Paris" vs " Paris")."""
    seqs: list[tuple[int, ...]] = []
    for word in words:
        if not word:
            continue
        for variant in (word, " " + word):
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False).ids)
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def flatten_word_ids(seqs: list[tuple[int, ...]]) -> list[list[int]]:
    """tensorrtllm_backend's [2, L] layout: row 0 the concatenated ids, row 1 end offsets padded with -1."""
    flat = [t for s in seqs for t in s]
    offsets, end = [], 0
    for s in seqs:
        end += len(s)
        offsets.append(end)
    offsets += [-1] * (len(flat) - len(offsets))
    return [flat, offsets]


def unflatten_word_ids(ids: list[int], offsets: list[int]) -> list[tuple[int, ...]]:
    """The token sequences of a [2, L] word list (see ``flatten_word_ids``); ValueError if its offsets do not
    rise within the ids."""
    seqs, start = [], 0
    for end in offsets:
        if end < 0:  # padding
            break
        if not start <= end <= len(ids):
            raise ValueError(f"word list offsets must rise within its {len(ids)} tokens (got {offsets})")
        if end > start:
            seqs.append(tuple(ids[start:end]))
        start = end
    return seqs

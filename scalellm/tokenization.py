"""Tokenizer loading, stop/bad-word encoding and windowed incremental detokenisation.

Streaming detokenisation is stateless per response, which suits Triton's per-response postprocessing
step: the ``llm`` model sends a short window of tokens ending at the newest one plus ``read_offset``,
the number of window tokens whose text was already delivered.  The delta is
``decode(window)[len(decode(window[:read_offset])):]``; an incomplete UTF-8 tail (U+FFFD) is held back
until the bytes that complete it arrive.  Decoding a window (not a single token) keeps SentencePiece /
BPE leading spaces, and the concatenated deltas equal the one-shot decode byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
DETOKENIZE_WINDOW = 8  # tokens of already-delivered context; >= the bytes of any UTF-8 character


def load_tokenizer(engine_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(engine_dir) / "tokenizer.json"))


def decode_delta(tokenizer: Tokenizer, window: list[int], read_offset: int, final: bool) -> str:
    """Text that ``window[read_offset:]`` adds after ``window[:read_offset]`` (see module doc)."""
    done = tokenizer.decode(window[:read_offset], skip_special_tokens=True).rstrip(REPLACEMENT)
    text = tokenizer.decode(window, skip_special_tokens=True)
    if not final:
        text = text.rstrip(REPLACEMENT)
    return text[len(done):] if len(text) > len(done) else ""


def detokenize_window(token_ids: list[int], sent_upto: int) -> tuple[list[int], int]:
    """The window (and its read offset) to send when ``token_ids[:sent_upto]`` were already delivered."""
    start = max(0, sent_upto - DETOKENIZE_WINDOW)
    return token_ids[start:], sent_upto - start


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
    seqs, start = [], 0
    for end in offsets:
        if end < 0:
            break
        seqs.append(tuple(ids[start:end]))
        start = end
    return [s for s in seqs if s]

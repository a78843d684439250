"""``preprocessing``: the prompt (optionally in the chat template) and the stop/bad words as token ids.

Tokenising is all it decides: lengths, ids and defaults of the sampling fields are the engine's (``request.py``).
The compatibility outputs of tensorrtllm_backend (``REQUEST_OUTPUT_LEN``, ``OUT_END_ID``, ``OUT_PAD_ID``,
``DECODER_INPUT_ID``) are filled as its preprocessing fills them, for callers that chain the models themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scalellm.config import hf_eos_token_ids, read_hf_config
from scalellm.tokenization import ChatTemplate, encode_word_list, flatten_word_ids, load_tokenizer
from scalellm.triton.contract import FIELDS, PRE, PRE_INPUTS, REQUEST_FIELDS
from scalellm.triton.tensors import Get, InvalidInput, check_refused, check_required, decode_words, scalar


class Preprocessor:
    def __init__(self, engine_dir: Path) -> None:
        self.tokenizer = load_tokenizer(engine_dir)
        self.chat = ChatTemplate(engine_dir)
        eos = hf_eos_token_ids(read_hf_config(engine_dir))  # only the end tokens: any architecture tokenises
        self.default_end_id = eos[0] if eos else -1
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def prompt_text(self, get: Get) -> str:
        query = get("QUERY")
        if query is None or np.asarray(query).size != 1:
            raise InvalidInput("text_input must hold exactly one string per request (batch of 1)")
        raw = scalar(query, "text_input")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"text_input is not valid UTF-8: {exc}") from None
        if not text:
            raise InvalidInput("text_input must not be empty")
        if scalar(get("APPLY_CHAT_TEMPLATE"), "apply_chat_template", FIELDS["apply_chat_template"].default):
            if not self.chat.available:
                raise InvalidInput("apply_chat_template: this model has no chat template")
            text = self.chat.user_prompt(text)
        return text

    def __call__(self, get: Get) -> dict[str, np.ndarray]:
        check_required(get, PRE_INPUTS)
        check_refused(get, [f for f in REQUEST_FIELDS if f.reader == PRE])
        ids = self.tokenizer.encode(self.prompt_text(get)).ids
        if not ids:
            raise InvalidInput("text_input encodes to zero tokens")
        end_id = scalar(get("END_ID"), "end_id", self.default_end_id)
        pad_id = scalar(get("PAD_ID"), "pad_id", max(end_id, 0))
        for name, value, low in (("end_id", end_id, -1), ("pad_id", pad_id, 0)):
            if not low <= value < self.vocab_size:
                raise InvalidInput(f"{name} must be in [{low}, {self.vocab_size}) (got {value})")
        stop = encode_word_list(self.tokenizer, decode_words(get("STOP_WORDS_DICT"), "stop_words"))
        bad = encode_word_list(self.tokenizer, decode_words(get("BAD_WORDS_DICT"), "bad_words"))
        max_tokens = scalar(get("REQUEST_OUTPUT_LEN"), "max_tokens", FIELDS["max_tokens"].default)

        def i32(value: object) -> np.ndarray:
            return np.asarray(value, dtype=np.int32)

        return {
            "INPUT_ID": i32([ids]),
            "REQUEST_INPUT_LEN": i32([[len(ids)]]),
            "REQUEST_OUTPUT_LEN": i32([[max_tokens]]),
            "DECODER_INPUT_ID": i32([[pad_id]]),
            "REQUEST_DECODER_INPUT_LEN": i32([[1]]),
            "STOP_WORDS_IDS": i32([flatten_word_ids(stop)]),
            "BAD_WORDS_IDS": i32([flatten_word_ids(bad)]),
            "OUT_END_ID": i32([[end_id]]),
            "OUT_PAD_ID": i32([[pad_id]]),
        }

"""Tokenise the prompt and the stop/bad word lists; check the lengths against the context.

Loads the tokenizer once per instance (not per request) from the engine directory.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from scalellm.config import ModelConfig
from scalellm.tokenization import encode_word_list, flatten_word_ids, load_tokenizer
from scalellm.triton_io import (
    InvalidInput,
    decode_words,
    engine_meta,
    model_parameters,
    resolve_engine_dir,
    scalar,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        engine_dir = resolve_engine_dir(args, model_parameters(args)["engine_dir"])
        self.tokenizer = load_tokenizer(engine_dir)
        meta = engine_meta(engine_dir)
        self.max_model_len = int(meta.get("max_model_len", 2048))
        eos = ModelConfig.from_engine_dir(engine_dir).eos_token_ids
        self.default_end_id = eos[0] if eos else -1
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._preprocess(request)))
            except InvalidInput as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def _input(self, request, name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _preprocess(self, request) -> list:
        query = self._input(request, "QUERY")
        if query is None or np.asarray(query).size != 1:
            raise InvalidInput("text_input must hold exactly one string per request (batch of 1)")
        raw = scalar(query, "text_input")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"text_input is not valid UTF-8: {exc}") from None
        if not text:
            raise InvalidInput("text_input must not be empty")
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise InvalidInput("text_input encodes to zero tokens")
        if len(ids) >= self.max_model_len:
            raise InvalidInput(
                f"text_input is {len(ids)} tokens; the context holds {self.max_model_len} tokens "
                f"(prompt + max_tokens), so the prompt must be at most {self.max_model_len - 1} tokens"
            )
        max_tokens = scalar(self._input(request, "REQUEST_OUTPUT_LEN"), "max_tokens")
        if max_tokens is None or max_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1 (got {max_tokens})")
        if len(ids) + max_tokens > self.max_model_len:
            raise InvalidInput(
                f"max_tokens must be <= {self.max_model_len - len(ids)} for this prompt: prompt "
                f"({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {self.max_model_len}"
            )
        end_id = scalar(self._input(request, "END_ID"), "end_id")
        pad_id = scalar(self._input(request, "PAD_ID"), "pad_id")
        # end_id -1 means "no end token" (generate max_tokens), as in TensorRT-LLM.
        for name, value, low in (("end_id", end_id, -1), ("pad_id", pad_id, 0)):
            if value is not None and not low <= value < self.vocab_size:
                raise InvalidInput(f"{name} must be in [{low}, {self.vocab_size}) (got {value})")
        resolved_end = self.default_end_id if end_id is None else end_id
        stop = encode_word_list(self.tokenizer, decode_words(self._input(request, "STOP_WORDS_DICT"), "stop_words"))
        bad = encode_word_list(self.tokenizer, decode_words(self._input(request, "BAD_WORDS_DICT"), "bad_words"))

        def i32(name: str, value) -> pb_utils.Tensor:
            return pb_utils.Tensor(name, np.asarray(value, dtype=np.int32))

        return [
            i32("INPUT_ID", [ids]),
            i32("REQUEST_INPUT_LEN", [[len(ids)]]),
            i32("REQUEST_OUTPUT_LEN", [[max_tokens]]),
            i32("STOP_WORDS_IDS", [flatten_word_ids(stop)]),
            i32("BAD_WORDS_IDS", [flatten_word_ids(bad)]),
            i32("OUT_END_ID", [[resolved_end]]),
            i32("OUT_PAD_ID", [[max(resolved_end, 0) if pad_id is None else pad_id]]),
            pb_utils.Tensor("OUT_END_ID_GIVEN", np.asarray([[end_id is not None]], dtype=bool)),
        ]

"""Detokenise each ``llm`` response: the text its token window adds (see ``scalellm.tokenization``).

Stateless per response, so it works whether a request streams one response or many; the other
outputs of ``llm`` pass through so every ensemble response comes from this one step.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from scalellm.tokenization import decode_delta, load_tokenizer
from scalellm.triton_io import model_parameters, resolve_engine_dir

PASS_THROUGH = {
    "FINISH_REASON": "OUT_FINISH_REASON",
    "NUM_OUTPUT_TOKENS": "OUT_NUM_OUTPUT_TOKENS",
    "NUM_CACHED_TOKENS": "OUT_NUM_CACHED_TOKENS",
    "ARRIVAL_TIME_NS": "OUT_ARRIVAL_TIME_NS",
    "FIRST_SCHEDULED_TIME_NS": "OUT_FIRST_SCHEDULED_TIME_NS",
    "FIRST_TOKEN_TIME_NS": "OUT_FIRST_TOKEN_TIME_NS",
    "LAST_TOKEN_TIME_NS": "OUT_LAST_TOKEN_TIME_NS",
    "CUM_LOG_PROBS": "OUT_CUM_LOG_PROBS",
    "OUTPUT_LOG_PROBS": "OUT_OUTPUT_LOG_PROBS",
}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.tokenizer = load_tokenizer(resolve_engine_dir(args, model_parameters(args)["engine_dir"]))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            def get(name: str, request=request) -> np.ndarray:
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            window = get("TOKENS_BATCH").reshape(-1).tolist()
            read_offset = int(get("READ_OFFSET").reshape(-1)[0])
            final = bool(get("IS_FINAL").reshape(-1)[0])
            text = decode_delta(self.tokenizer, window, read_offset, final)
            tensors = [pb_utils.Tensor("OUTPUT", np.asarray([[text.encode("utf-8")]], dtype=object))]
            for src, dst in PASS_THROUGH.items():
                tensors.append(pb_utils.Tensor(dst, get(src)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

"""The ``postprocessing`` model: a ``pb_utils`` adapter over ``scalellm.triton.postprocess.postprocess``.

Stateless per response, so it works whether a request streams one response or many.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from scalellm.tokenization import load_tokenizer
from scalellm.triton.postprocess import postprocess
from scalellm.triton.tensors import InvalidInput, model_parameters, resolve_engine_dir


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.tokenizer = load_tokenizer(resolve_engine_dir(args, model_parameters(args)["engine_dir"]))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            def get(name: str, request=request) -> np.ndarray | None:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                outputs = postprocess(self.tokenizer, get)
            except InvalidInput as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

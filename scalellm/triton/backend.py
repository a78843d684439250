"""What every Python-backend model in ``model_repository*/`` does with ``pb_utils``: read a request's inputs
through a ``get`` function (what the parsers in this package take) and answer it.

Imported only inside Triton's Python stub, the one place ``triton_python_backend_utils`` exists; everything the
models decide lives in the Triton-free modules next to this one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from scalellm.triton.tensors import Get, InvalidInput


def inputs_of(request) -> Get:
    """``get(name)``: the request's input ``name`` as an array, None when the request does not carry it.

    The inputs are listed once per request: ``pb_utils.get_input_tensor_by_name`` wraps every input anew on each
    call, and postprocessing asks for some twenty names per streamed token."""
    by_name = {tensor.name(): tensor for tensor in request.inputs()}

    def get(name: str) -> np.ndarray | None:
        tensor = by_name.get(name)
        return None if tensor is None else tensor.as_numpy()

    return get


def tensors_response(outputs: dict[str, np.ndarray]):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])


def error_response(message: str, invalid: bool = False, unavailable: bool = False):
    code = (pb_utils.TritonError.INVALID_ARG if invalid else
            pb_utils.TritonError.UNAVAILABLE if unavailable else pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def answer_each(requests: list, handle: Callable[[Get], dict[str, np.ndarray]]) -> list:
    """One response per request (the non-decoupled models): ``handle``'s outputs, or INVALID_ARG naming the field."""
    responses = []
    for request in requests:
        try:
            responses.append(tensors_response(handle(inputs_of(request))))
        except InvalidInput as exc:
            responses.append(error_response(str(exc), invalid=True))
    return responses

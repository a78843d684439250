"""The ``preprocessing`` model: a ``pb_utils`` adapter over ``scalellm.triton.preprocess.Preprocessor``.

The tokenizer (and the chat template) are loaded once per instance, not per request.
"""

from __future__ import annotations

from scalellm.triton.backend import answer_each
from scalellm.triton.preprocess import Preprocessor
from scalellm.triton.tensors import model_parameters, resolve_engine_dir


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.preprocess = Preprocessor(resolve_engine_dir(args, model_parameters(args)["engine_dir"]))

    def execute(self, requests: list) -> list:
        return answer_each(requests, self.preprocess)

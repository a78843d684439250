"""The ``postprocessing`` model: a ``pb_utils`` adapter over ``scalellm.triton.postprocess.postprocess``.

Stateless per response, so it works whether a request streams one response or many.
"""

from __future__ import annotations

from functools import partial

from scalellm.tokenization import load_tokenizer
from scalellm.triton.backend import answer_each
from scalellm.triton.postprocess import postprocess
from scalellm.triton.tensors import model_parameters, resolve_engine_dir


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        tokenizer = load_tokenizer(resolve_engine_dir(args, model_parameters(args)["engine_dir"]))
        self.postprocess = partial(postprocess, tokenizer)

    def execute(self, requests: list) -> list:
        return answer_each(requests, self.postprocess)

"""TensorRT-LLM's LLM API (PyTorch backend) behind the official ``tensorrt_llm`` tensors. GPU only.

Coded against TensorRT-LLM's documented LLM API (``LLM``, ``SamplingParams``, ``LLM.generate_async``), not run
on our CPU machines: see docs/gpu.md. Requests are parsed by the llm model's parser against the contract's
defaults and bounds (``scalellm/triton/request.py``), so a field means the same whichever model serves the
ensemble. One asyncio loop thread owns every request; ``generate_async`` batches them in flight. Streaming sends
each step's new tokens (as the C++ backend does); otherwise one response, the prompt first unless
``exclude_input_in_output``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils
import yaml

from scalellm.triton.backend import error_response, inputs_of, tensors_response
from scalellm.triton.request import LLMRequest, parse
from scalellm.triton.tensors import InvalidInput
from scalellm.trtllm import require
from scalellm.trtllm.llm_api import engine_limits, output_arrays, sampling_kwargs, token_log_probs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def create_llm(llm_args: dict):
    """``LLM(**llm_args)``: the PyTorch-backend class of TensorRT-LLM 0.19 (``tensorrt_llm._torch.LLM``), else
    ``tensorrt_llm.LLM`` (1.x, where PyTorch is the default backend)."""
    llm_utils = require("tensorrt_llm.llmapi.llm_utils")
    args = llm_utils.update_llm_args_with_extra_dict({}, llm_args)  # nested dicts -> TensorRT-LLM config objects
    try:
        llm_class = require("tensorrt_llm._torch").LLM
    except Exception:
        llm_class = require("tensorrt_llm").LLM
    return llm_class(**args)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_dir = Path(args["model_repository"])
        llm_args = yaml.safe_load((model_dir / "model.yaml").read_text())
        llm_args.pop("triton_config", None)
        model = Path(llm_args["model"])
        if not model.is_absolute():  # relative to the repository root, like our engine_dir
            llm_args["model"] = str((model_dir.parent / model).resolve())
        policy = json.loads(args["model_config"]).get("model_transaction_policy", {})
        self.limits = engine_limits(llm_args, decoupled=bool(policy.get("decoupled", False)))
        self.sampling_params = require("tensorrt_llm").SamplingParams
        self.llm = create_llm(llm_args)
        self.tokenizer = self.llm.tokenizer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llm-api-loop", daemon=True)
        self.thread.start()
        self.log = pb_utils.Logger
        self.log.log_info(f"[tensorrt_llm_pytorch] LLM ready: {json.dumps(llm_args, default=str)}")

    def execute(self, requests: list) -> None:
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._serve(request, time.time_ns()), self.loop)
        return None

    def _params(self, parsed: LLMRequest):
        if len(parsed.samples) != 1:
            raise InvalidInput(f"num_return_sequences must be 1 on the LLM-API path (got {len(parsed.samples)})")
        kwargs = sampling_kwargs(parsed.samples[0], self.limits.eos_token_ids)
        for words_key, field in (("stop_words", "stop"), ("bad_words", "bad")):
            words = kwargs.pop(words_key, None)
            if words:
                kwargs[field] = [self.tokenizer.decode(ids) for ids in words]
        return self.sampling_params(**kwargs)

    async def _serve(self, request, arrival_ns: int) -> None:
        sender = request.get_response_sender()
        try:
            parsed = parse(inputs_of(request), self.limits)
            params = self._params(parsed)
            want_logs = parsed.samples[0].return_log_probs
            marks = ({"arrival_time_ns": arrival_ns, "first_scheduled_time_ns": time.time_ns()}
                     if parsed.perf_metrics else None)
            result = self.llm.generate_async(parsed.prompt, sampling_params=params, streaming=parsed.stream)
            if parsed.stream:
                sent = 0
                async for output in result:
                    if request.is_cancelled():
                        result.abort()
                        break
                    completion = output.outputs[0]
                    new = list(completion.token_ids[sent:])
                    logs = token_log_probs(completion.logprobs, completion.token_ids)[sent:] if want_logs else None
                    self._mark(marks)
                    self._send(sender, new, logs, completion.cumulative_logprob if want_logs else None, marks,
                               FINAL if output.finished else 0)
                    sent = len(completion.token_ids)
                    if output.finished:
                        return
                sender.send(flags=FINAL)
            else:
                output = await result.aresult()
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                logs = token_log_probs(completion.logprobs, ids) if want_logs else None
                self._mark(marks)
                self._send(sender, parsed.echoed_prompt + ids, logs,
                           completion.cumulative_logprob if want_logs else None, marks, FINAL)
        except InvalidInput as error:
            sender.send(error_response(str(error), invalid=True), flags=FINAL)
        except Exception as error:  # the server keeps serving everyone else
            self.log.log_error(f"[tensorrt_llm_pytorch] request failed: {error!r}")
            sender.send(error_response(str(error)), flags=FINAL)

    @staticmethod
    def _mark(marks: dict | None) -> None:
        """Token times as seen here (the first response sets the first-token mark)."""
        if marks is not None:
            now = time.time_ns()
            marks.setdefault("first_token_time_ns", now)
            marks["last_token_time_ns"] = now

    @staticmethod
    def _send(sender, ids: list[int], logs: list[float] | None, cum: float | None, marks: dict | None,
              flags: int) -> None:
        sender.send(tensors_response(output_arrays(ids, logs, cum, marks)), flags=flags)

    def finalize(self) -> None:
        self.llm.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

"""The ``llm`` model: a ``pb_utils`` adapter over ``scalellm.triton.host.EngineHost`` (one engine per instance).

``execute`` hands each request to the host and returns at once; the engine's loop thread generates for every
request in flight and the host's sender thread answers through the request's response sender (also in the
non-decoupled deployment, where each request gets exactly one response).
"""

from __future__ import annotations

import gc
import json

import triton_python_backend_utils as pb_utils

from scalellm.engine.engine import LLMEngine
from scalellm.metrics import EngineMetrics
from scalellm.models.engine_meta import EngineMeta
from scalellm.triton.backend import error_response, inputs_of, tensors_response
from scalellm.triton.host import EngineHost
from scalellm.triton.params import default_timeout_ms, engine_config, stream_config
from scalellm.triton.tensors import model_parameters, resolve_engine_dir


class Responder:
    """``scalellm.triton.host.Responder`` over a Triton response sender."""

    def __init__(self, sender) -> None:
        self.sender = sender

    def send(self, tensors, error=None, final=False, invalid=False, unavailable=False) -> None:
        response = (error_response(error, invalid, unavailable) if error is not None else
                    tensors_response(tensors))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        gc.disable()  # loading makes objects, not garbage: the full collections it set off cost ~0.6 s of the load
        try:
            self._load(args)
        finally:  # one collection of what loading left, then the survivors (the model) out of every later one
            gc.collect()
            gc.freeze()
            gc.enable()

    def _load(self, args: dict) -> None:
        params = model_parameters(args)
        engine_dir = resolve_engine_dir(args, params["engine_dir"])
        engine = LLMEngine(engine_config(params, engine_dir, EngineMeta.read(engine_dir)))
        labels = {"model": args["model_name"], "version": args["model_version"],
                  "instance": args["model_instance_name"]}
        metrics = EngineMetrics(pb_utils, labels, kv_blocks_total=engine.blocks.num_blocks)
        engine.on_step = metrics.record
        policy = json.loads(args["model_config"]).get("model_transaction_policy", {})
        self.host = EngineHost(engine, decoupled=bool(policy.get("decoupled", False)),
                               on_log=pb_utils.Logger.log_info, default_timeout_ms=default_timeout_ms(params),
                               on_reject=metrics.record_rejection, stream=stream_config(params))
        self.host.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            self.host.handle(inputs_of(request), request.request_id(), Responder(request.get_response_sender()))
        return None

    def finalize(self) -> None:
        self.host.stop()

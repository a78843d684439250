"""The ``llm`` model: a decoupled Python backend hosting one in-flight batching engine per instance.

``execute`` validates each request, hands it to the engine and returns at once; the engine's loop
thread generates for every request in flight, and a sender thread turns its outputs into Triton
responses (so response IPC never stalls the engine).  With ``streaming`` false a request gets exactly
one response (what HTTP ``generate`` needs); with it true, one per step plus the final one.
Each response carries a detokenisation window (see ``scalellm.tokenization``) for postprocessing.
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
from scalellm.drain import DrainWatch
from scalellm.engine.admission import Unavailable
from scalellm.engine.deadlines import request_timeout_s
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import RequestOutput, SamplingParams, Sequence
from scalellm.metrics import EngineMetrics
from scalellm.tokenization import detokenize_window, unflatten_word_ids
from scalellm.triton_io import (
    InvalidInput,
    check_range,
    engine_meta,
    model_parameters,
    resolve_engine_dir,
    scalar,
)

CANCEL_POLL_S = 0.25
# tensorrtllm_backend's names for the engine's wall-clock (time.time_ns) marks of a request
PERF_OUTPUTS = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


@dataclass
class RequestState:
    request_id: str  # unique inside this instance
    triton_id: str  # the client's request id (may be empty or shared)
    sender: object  # pb_utils.InferenceResponseSender
    stream: bool
    sent_upto: int  # tokens (prompt + output) whose text was already delivered
    sent_log_probs: int = 0
    perf_metrics: bool = False  # return the engine's timestamps (return_perf_metrics)
    done: bool = False


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        engine_dir = resolve_engine_dir(args, params["engine_dir"])
        meta = engine_meta(engine_dir)
        config = EngineConfig(
            engine_dir=str(engine_dir),
            device=params.get("device", "cpu"),
            dtype=meta.get("dtype", "float32"),
            cache=CacheConfig(
                block_size=int(params.get("kv_block_size", 16)),
                num_blocks=int(params["kv_cache_blocks"]) if params.get("kv_cache_blocks") else None,
                memory_bytes=int(params.get("kv_cache_memory_bytes", 1 << 30)),
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=int(params.get("max_num_seqs", 64)),
                max_num_batched_tokens=int(params.get("max_num_batched_tokens", 512)),
                max_model_len=int(meta.get("max_model_len", 2048)),
                max_queue_size=int(params["max_queue_size"]) if params.get("max_queue_size") else None,
            ),
            num_threads=int(params.get("num_threads", 0)) or None,
        )
        self.engine = LLMEngine(config)
        labels = {"model": args["model_name"], "version": args["model_version"],
                  "instance": args["model_instance_name"]}
        self.metrics = EngineMetrics(pb_utils, labels)
        self.engine.on_step = self.metrics.record
        # reliability hooks: default deadline, drain announced by the launcher (scalellm.drain)
        self.default_timeout_ms = int(params.get("default_timeout_ms") or 0)
        self.drain_watch = DrainWatch()
        self.draining = False
        self.vocab_size = self.engine.model_config.vocab_size
        self.eos_ids = tuple(self.engine.model_config.eos_token_ids)
        self._ids = itertools.count()
        self._outbox: queue.Queue[tuple[RequestState, RequestOutput] | None] = queue.Queue()
        self._active: dict[str, RequestState] = {}
        self._sender_thread = threading.Thread(target=self._send_loop, name="llm-sender", daemon=True)
        self._sender_thread.start()
        self.engine.start()

    def finalize(self) -> None:
        self.engine.stop()
        self._outbox.put(None)
        self._sender_thread.join(timeout=10)

    # ---- requests in ----
    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            cancel = pb_utils.get_input_tensor_by_name(request, "cancel_request_id")
            if cancel is not None:
                self._cancel_by_triton_id(scalar(cancel.as_numpy(), "cancel_request_id"))
                sender.send(pb_utils.InferenceResponse(output_tensors=[]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            try:
                seq, state = self._parse(request, sender)
                timeout = pb_utils.get_input_tensor_by_name(request, "timeout_ms")  # reliability hook
                timeout_s = request_timeout_s(None if timeout is None else scalar(timeout.as_numpy(), "timeout_ms"),
                                              self.default_timeout_ms)
            except (InvalidInput, ValueError, TypeError) as exc:
                self._reject(sender, str(exc))
                continue
            self._active[state.request_id] = state
            try:
                self.engine.submit(seq, timeout_s)
            except ValueError as exc:  # can never fit the KV cache
                self._active.pop(state.request_id, None)
                self._reject(sender, str(exc))
            except Unavailable as exc:  # reliability hook: busy, draining or engine failed -> retry later
                self._active.pop(state.request_id, None)
                self.metrics.record_rejection(exc.reason)
                self._reject(sender, str(exc), pb_utils.TritonError.UNAVAILABLE)
        return None

    def _cancel_by_triton_id(self, triton_id: bytes | str) -> None:
        """Explicit cancel by the client's request id.  Needed because Triton 2.51 does not pass a
        cancelled ensemble request on to its composing models, so ``is_cancelled`` stays False here."""
        triton_id = triton_id.decode() if isinstance(triton_id, bytes) else str(triton_id)
        for state in list(self._active.values()):
            if triton_id and state.triton_id == triton_id and not state.done:
                pb_utils.Logger.log_info(f"llm: request {state.request_id} cancelled by the client")
                self.engine.cancel(state.request_id)

    @staticmethod
    def _reject(sender, message: str, code=None) -> None:
        error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG if code is None else code)
        sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _parse(self, request, sender) -> tuple[Sequence, RequestState]:
        def get(name: str, default=None):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return default if tensor is None else scalar(tensor.as_numpy(), name)

        def words(name: str) -> tuple[tuple[int, ...], ...]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return ()
            ids, offsets = tensor.as_numpy().reshape(2, -1).tolist()
            return tuple(unflatten_word_ids(ids, offsets))

        prompt_ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if prompt_ids is None or get("request_output_len") is None:
            raise InvalidInput("input_ids and request_output_len are required (unless cancel_request_id is given)")
        prompt = prompt_ids.as_numpy().reshape(-1).tolist()
        max_tokens = int(get("request_output_len"))
        beam_width = int(get("beam_width", 1))
        if beam_width != 1:
            raise InvalidInput(f"beam_width must be 1 (beam search is not implemented; got {beam_width})")
        top_k = int(get("runtime_top_k", 0))
        top_p = float(get("runtime_top_p", 1.0))
        temperature = get("temperature")
        check_range("top_k", top_k, low=0, high=self.vocab_size)
        check_range("top_p", top_p, low=0.0, low_open=True, high=1.0)
        min_p = float(get("min_p", 0.0))
        check_range("min_p", min_p, low=0.0, high=1.0)
        sampling_asked = top_k > 1 or top_p < 1.0 or min_p > 0.0
        temperature = float(temperature) if temperature is not None else (1.0 if sampling_asked else 0.0)
        check_range("temperature", temperature, low=0.0)
        repetition = float(get("repetition_penalty", 1.0))
        check_range("repetition_penalty", repetition, low=0.0, low_open=True)
        presence = float(get("presence_penalty", 0.0))
        frequency = float(get("frequency_penalty", 0.0))
        check_range("presence_penalty", presence, low=-2.0, high=2.0)
        check_range("frequency_penalty", frequency, low=-2.0, high=2.0)
        check_range("length_penalty", float(get("len_penalty", 1.0)))  # beam search only: no effect here
        min_tokens = int(get("min_tokens", get("min_length", 0)))
        check_range("min_tokens", min_tokens, low=0, high=max_tokens)
        seed = get("seed", get("random_seed"))
        seed = random.getrandbits(63) if seed is None else int(seed) % (1 << 63)
        end_id = int(get("end_id", -1))
        if get("end_id_given", False):  # the client's end_id replaces the model's; -1 = none
            stop_ids = (end_id,) if end_id >= 0 else ()
        else:
            stop_ids = tuple({end_id, *self.eos_ids} - {-1})
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            min_tokens=min_tokens,
            stop_token_ids=stop_ids,
            stop_sequences=words("stop_words_list"),
            bad_sequences=words("bad_words_list"),
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            return_log_probs=bool(get("return_log_probs", False)),
        )
        exclude_input = bool(get("exclude_input_in_output", True))
        state = RequestState(
            request_id=f"{request.request_id() or 'req'}-{next(self._ids)}",
            triton_id=request.request_id(),
            sender=sender,
            stream=bool(get("streaming", False)),
            perf_metrics=bool(get("return_perf_metrics", False)),
            sent_upto=len(prompt) if exclude_input else 0,
        )
        seq = Sequence(state.request_id, prompt, params, on_output=lambda out: self._outbox.put((state, out)))
        return seq, state

    # ---- responses out ----
    def _send_loop(self) -> None:
        last_poll = time.monotonic()
        while True:
            try:
                item = self._outbox.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                state, out = item
                try:
                    self._send(state, out)
                except Exception as exc:  # a client gone mid-stream must not stop the sender
                    pb_utils.Logger.log_warn(f"llm: sending a response for {state.request_id} failed: {exc}")
                    if not out.finish_reason:
                        self.engine.cancel(state.request_id)
            if time.monotonic() - last_poll >= CANCEL_POLL_S:
                last_poll = time.monotonic()
                self._watch_lifecycle()
                for state in list(self._active.values()):
                    if not state.done and state.sender.is_cancelled():
                        pb_utils.Logger.log_info(f"llm: request {state.request_id} cancelled by the client")
                        self.engine.cancel(state.request_id)

    def _watch_lifecycle(self) -> None:
        """Reliability hook: start the drain the launcher announced; exit the stub once a dead engine's
        requests have all been failed, so the launcher sees the fault and the server gets restarted."""
        deadline = self.drain_watch.deadline()
        if deadline is not None and not self.draining:
            self.draining = True
            pb_utils.Logger.log_info(f"llm: draining, requests still running at +{deadline - time.time():.0f} s "
                                     "end with finish reason 'shutdown'")
            self.engine.drain(deadline)
        if self.engine.failure is not None and self._outbox.empty():
            pb_utils.Logger.log_error(f"llm: engine thread died ({self.engine.failure!r}); exiting this stub")
            time.sleep(0.5)  # let the error responses already sent reach Triton
            os._exit(1)

    def _send(self, state: RequestState, out: RequestOutput) -> None:
        final = out.finish_reason is not None
        if state.done or (not final and not state.stream):
            return
        if final:
            state.done = True
            self._active.pop(state.request_id, None)
        if out.error:
            error = pb_utils.TritonError(out.error, pb_utils.TritonError.INTERNAL)
            state.sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error),
                              flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if not final and len(out.token_ids) <= state.sent_upto:
            return  # nothing new to show (held back behind a possible stop sequence)
        window, read_offset = detokenize_window(out.token_ids, state.sent_upto)
        state.sent_upto = len(out.token_ids)
        log_probs = out.log_probs
        if log_probs is not None and state.stream:  # a stream response carries its own tokens' log-probs
            log_probs, cum = log_probs[state.sent_log_probs:], sum(log_probs)
            state.sent_log_probs = len(out.log_probs)
        else:
            cum = sum(log_probs) if log_probs is not None else 0.0
        tensors = [
            pb_utils.Tensor("output_ids", np.asarray([window], dtype=np.int32)),
            pb_utils.Tensor("read_offset", np.asarray([[read_offset]], dtype=np.int32)),
            pb_utils.Tensor("is_final", np.asarray([[final]], dtype=bool)),
            pb_utils.Tensor("finish_reason", np.asarray([[(out.finish_reason or "").encode()]], dtype=object)),
            pb_utils.Tensor("num_output_tokens", np.asarray([[out.num_output_tokens]], dtype=np.int32)),
            pb_utils.Tensor("num_cached_tokens", np.asarray([[out.num_cached_tokens]], dtype=np.int32)),
            pb_utils.Tensor("cum_log_probs",
                            np.asarray([[cum] if log_probs is not None else []], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs",
                            np.asarray([[log_probs if log_probs is not None else []]], dtype=np.float32)),
        ]
        t = out.timings
        marks = (t.arrival_ns, t.first_scheduled_ns, t.first_token_ns, t.last_token_ns)
        if not state.perf_metrics:
            marks = (0, 0, 0, 0)
        for name, value in zip(PERF_OUTPUTS, marks, strict=True):
            tensors.append(pb_utils.Tensor(name, np.asarray([[value]], dtype=np.int64)))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        state.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

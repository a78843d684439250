"""The request contract in one table: every tensor of the four models, its type, dims, default and reader.

Names, types and dims follow NVIDIA tensorrtllm_backend's ``inflight_batcher_llm`` (r25.05: ``ensemble``,
``preprocessing``, ``tensorrt_llm`` — ours is called ``llm`` — and ``postprocessing``), plus a few of our own
(marked ``ours``).  ``build_engines.py`` renders the ``input``/``output`` sections of all four
``config.pbtxt`` and the ensemble's steps from these tables (``render.py``); the request parser reads
defaults from them; the client's torch-free request table is checked against them by a test.

Ensemble inputs are declared once, in :data:`REQUEST_FIELDS`: the model that reads a field and its name
there.  A field with ``param`` is read, range-checked and handed to ``SamplingParams`` by the llm parser
without further code, so adding an optional sampling field = one ``Field`` row here + the engine reading it
(``SamplingParams`` and the sampler) + the client's request table.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.config import DEFAULT_MAX_TOKENS

PRE, LLM, POST = "preprocessing", "llm", "postprocessing"


@dataclass(frozen=True)
class Tensor:
    """One model input or output as Triton's config.pbtxt declares it (dims exclude the batch dim).

    ``required``: a request without it is refused with a message naming it (``field``, the ensemble name, when
    it differs). Triton 2.51 only counts a request's inputs against the non-``optional`` ones, and runs no
    ensemble step that waits on a missing non-optional ensemble input (the request then ends without a response
    or as a "deadlock"), so the models check their required inputs themselves (``tensors.check_required``), the
    ensemble declares every input optional, and each model keeps one non-optional input, which makes Triton
    refuse a request with no inputs at all (the Python backend would fail it and its whole batch)."""

    name: str
    dtype: str  # Triton type without TYPE_: STRING INT32 INT64 UINT64 FP32 BOOL
    dims: tuple[int, ...] = (1,)
    optional: bool = True
    required: bool = False
    field: str = ""  # the ensemble field this input carries, for messages

    @property
    def label(self) -> str:
        return f"{self.field} ({self.name})" if self.field and self.field != self.name else self.name


@dataclass(frozen=True)
class Field:
    """A request field: an ensemble input, the model that reads it, and what it means."""

    name: str  # ensemble input name
    dtype: str
    reader: str  # PRE or LLM
    model_input: str  # its name in the reader
    dims: tuple[int, ...] = (1,)
    default: object = None  # value when absent; None: absent means "not set"
    doc: str = ""
    refused: str = ""  # non-empty: accepted by the schema but refused with this reason when set
    required: bool = False
    param: str = ""  # a SamplingParams attribute the llm parser fills from this field, checked against:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is out of bounds


# ---- the request: ensemble inputs ------------------------------------------------------------------------
REQUEST_FIELDS: tuple[Field, ...] = (
    Field("text_input", "STRING", PRE, "QUERY", required=True, doc="the prompt (UTF-8)"),
    Field("max_tokens", "INT32", LLM, "request_output_len", default=DEFAULT_MAX_TOKENS,
          doc="tokens to generate at most; prompt + max_tokens <= the context"),
    Field("apply_chat_template", "BOOL", PRE, "APPLY_CHAT_TEMPLATE", default=False,
          doc="ours: wrap text_input as one user message in the model's chat template"),
    Field("bad_words", "STRING", PRE, "BAD_WORDS_DICT", dims=(-1,), doc="words never generated"),
    Field("stop_words", "STRING", PRE, "STOP_WORDS_DICT", dims=(-1,), doc="words that end generation"),
    Field("embedding_bias_words", "STRING", PRE, "EMBEDDING_BIAS_WORDS", dims=(-1,),
          refused="embedding bias is not implemented"),
    Field("embedding_bias_weights", "FP32", PRE, "EMBEDDING_BIAS_WEIGHTS", dims=(-1,),
          refused="embedding bias is not implemented"),
    Field("pad_id", "INT32", PRE, "PAD_ID", doc="compatibility only: validated, never used"),
    Field("end_id", "INT32", LLM, "end_id",
          doc="the one end token (-1: none); absent: the model's end tokens"),
    Field("exclude_input_in_output", "BOOL", LLM, "exclude_input_in_output", default=False,
          doc="false: the prompt's text comes first in a non-streamed text_output (as in TensorRT-LLM)"),
    Field("stream", "BOOL", LLM, "streaming", default=False, doc="one response per step (decoupled mode)"),
    Field("stream_interval", "INT32", LLM, "stream_interval", low=1,
          doc="ours (vLLM's, SGLang's, TensorRT-LLM's name): streaming, a response every this many tokens after "
          "the first, the last always; absent: the llm's stream_interval parameter (1)"),
    Field("num_return_sequences", "INT32", LLM, "num_return_sequences", default=1,
          doc="samples per prompt, each its own response with sequence_index (decoupled mode)"),
    Field("beam_width", "INT32", LLM, "beam_width", default=1, doc="only 1: beam search is not implemented"),
    Field("temperature", "FP32", LLM, "temperature", default=1.0,
          doc="0 = greedy; it does not turn sampling on by itself (see sampling_mode)"),
    Field("top_k", "INT32", LLM, "runtime_top_k", default=0, doc="0 = no top-k; with top_p 0: greedy"),
    Field("top_p", "FP32", LLM, "runtime_top_p", default=0.0, doc="0 = no top-p; with top_k 0: greedy"),
    Field("min_p", "FP32", LLM, "min_p", default=0.0, doc="ours: applies when sampling", param="min_p",
          low=0.0, high=1.0),
    Field("length_penalty", "FP32", LLM, "len_penalty", default=1.0, doc="beam search only: no effect"),
    Field("repetition_penalty", "FP32", LLM, "repetition_penalty", default=1.0,
          param="repetition_penalty", low=0.0, low_open=True),
    Field("presence_penalty", "FP32", LLM, "presence_penalty", default=0.0,
          param="presence_penalty", low=-2.0, high=2.0),
    Field("frequency_penalty", "FP32", LLM, "frequency_penalty", default=0.0,
          param="frequency_penalty", low=-2.0, high=2.0),
    Field("min_length", "INT32", LLM, "min_length", default=0, doc="no end before this many tokens"),
    Field("min_tokens", "INT32", LLM, "min_tokens", doc="ours: alias of min_length"),
    Field("random_seed", "UINT64", LLM, "random_seed", doc="absent: random"),
    Field("seed", "UINT64", LLM, "seed", doc="ours: alias of random_seed"),
    Field("timeout_ms", "UINT64", LLM, "timeout_ms",
          doc="ours: deadline for queue + generation in ms (0/absent: the llm's default_timeout_ms); "
          "past it the request ends with finish reason timeout"),
    Field("return_log_probs", "BOOL", LLM, "return_log_probs", default=False, param="return_log_probs"),
    Field("return_perf_metrics", "BOOL", LLM, "return_perf_metrics", default=False,
          doc="adds the *_time_ns, kv_cache_* and draft-token outputs"),
    Field("return_num_input_tokens", "BOOL", LLM, "return_num_input_tokens", default=False,
          doc="adds num_input_tokens"),
    Field("return_num_output_tokens", "BOOL", LLM, "return_num_output_tokens", default=False,
          doc="num_output_tokens is always returned"),
    Field("return_context_logits", "BOOL", LLM, "return_context_logits", default=False,
          refused="context logits are not implemented"),
    Field("return_generation_logits", "BOOL", LLM, "return_generation_logits", default=False,
          refused="generation logits are not implemented"),
    Field("guided_decoding_guide_type", "STRING", LLM, "guided_decoding_guide_type",
          refused="guided decoding is not implemented"),
    Field("guided_decoding_guide", "STRING", LLM, "guided_decoding_guide",
          refused="guided decoding is not implemented"),
)
FIELDS = {f.name: f for f in REQUEST_FIELDS}
LLM_FIELDS = {f.model_input: f for f in REQUEST_FIELDS if f.reader == LLM}


def sampling_mode(top_k: int, top_p: float) -> tuple[int, float]:
    """TensorRT-LLM's rule: the (top_k, top_p) a request's (validated) fields decode with; top_p 1.0 = no top-p.

    (0, 0) is greedy (k = 1), and both default to 0, so a request that sets neither is greedy whatever its
    temperature; (k > 0, 0) is pure top-k; (0, p > 0) is top-p; (k > 0, p > 0) both. As TensorRT-LLM's
    ``DefaultDecodingParams`` (top_k 0, top_p 0, temperature 1) and ``setupTopKRuntimeArgs`` kernel
    (``cpp/tensorrt_llm/layers/defaultDecodingParams.h``, ``cpp/tensorrt_llm/kernels/samplingTopKKernels.cu``).
    """
    if top_k == 0 and top_p == 0.0:
        return 1, 1.0
    return top_k, top_p or 1.0


# ---- what each model declares ----------------------------------------------------------------------------
def _reader_inputs(reader: str) -> list[Tensor]:
    return [Tensor(f.model_input, f.dtype, f.dims, optional=not f.required, required=f.required, field=f.name)
            for f in REQUEST_FIELDS if f.reader == reader]


def _ensemble_input(f: Field) -> Tensor:
    return Tensor(f.name, f.dtype, f.dims, optional=True, required=f.required)


PRE_INPUTS = [
    *_reader_inputs(PRE),
    Tensor("REQUEST_OUTPUT_LEN", "INT32"),  # compatibility: passed through (llm reads max_tokens itself)
    Tensor("END_ID", "INT32"),  # compatibility: checked, passed through as OUT_END_ID (llm reads end_id itself)
]
PRE_OUTPUTS = [
    Tensor("INPUT_ID", "INT32", (-1,)),
    Tensor("REQUEST_INPUT_LEN", "INT32"),
    Tensor("REQUEST_OUTPUT_LEN", "INT32"),
    Tensor("DECODER_INPUT_ID", "INT32", (-1,)),  # compatibility: [pad_id], decoder-only models ignore it
    Tensor("REQUEST_DECODER_INPUT_LEN", "INT32"),
    Tensor("BAD_WORDS_IDS", "INT32", (2, -1)),
    Tensor("STOP_WORDS_IDS", "INT32", (2, -1)),
    Tensor("OUT_END_ID", "INT32"),
    Tensor("OUT_PAD_ID", "INT32"),
]
LLM_INPUTS = [
    # Required; a cancel request (cancel_request_id or stop alone) passes Triton's count of inputs all the same.
    Tensor("input_ids", "INT32", (-1,), optional=False, required=True),
    Tensor("input_lengths", "INT32"),  # compatibility: checked against input_ids
    *_reader_inputs(LLM),
    Tensor("pad_id", "INT32"),  # compatibility: ignored
    Tensor("stop_words_list", "INT32", (2, -1)),
    Tensor("bad_words_list", "INT32", (2, -1)),
    Tensor("decoder_input_ids", "INT32", (-1,)),  # compatibility: ignored (decoder-only models)
    Tensor("decoder_input_lengths", "INT32"),
    Tensor("stop", "BOOL"),  # tensorrtllm_backend's stop signal: cancels the request with this request id
    Tensor("cancel_request_id", "STRING"),  # ours: cancels the request with that Triton request id
]
# Per-request output tensors of llm, as postprocessing reads them; [batch, beam, ...] like tensorrt_llm.
LLM_OUTPUTS = [
    Tensor("output_ids", "INT32", (-1, -1)),  # [1, 1, n]: new tokens (streaming) or all (prompt first unless excluded)
    Tensor("sequence_length", "INT32", (-1,)),  # [1, 1]: n
    Tensor("context_ids", "INT32", (-1, -1)),  # ours: up to 8 tokens shown before output_ids, for detokenising
    Tensor("finish_reason", "STRING"),  # ours, in a sequence's last response only: stop | length | cancelled ...
    Tensor("num_input_tokens", "INT32"),
    Tensor("num_output_tokens", "INT32"),
    Tensor("num_cached_tokens", "INT32"),  # ours: prompt tokens served from the prefix cache
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
    Tensor("batch_index", "INT32"),
    Tensor("sequence_index", "INT32"),
    Tensor("arrival_time_ns", "INT64"),
    Tensor("first_scheduled_time_ns", "INT64"),
    Tensor("first_token_time_ns", "INT64"),
    Tensor("last_token_time_ns", "INT64"),
    Tensor("kv_cache_alloc_new_blocks", "INT32"),
    Tensor("kv_cache_reused_blocks", "INT32"),
    Tensor("kv_cache_alloc_total_blocks", "INT32"),
    Tensor("acceptance_rate", "FP32"),  # speculative decoding: always 0 here
    Tensor("total_accepted_draft_tokens", "INT32"),
    Tensor("total_draft_tokens", "INT32"),
]
# llm output -> (postprocessing input, postprocessing output, ensemble output); output_ids/sequence_length
# become text_output.
PASS_THROUGH = [t.name for t in LLM_OUTPUTS if t.name not in ("output_ids", "sequence_length", "context_ids")]
POST_INPUTS = [
    Tensor("TOKENS_BATCH", "INT32", (-1, -1), optional=False, required=True),
    Tensor("SEQUENCE_LENGTH", "INT32", (-1,), optional=False, required=True),
    Tensor("CONTEXT_IDS", "INT32", (-1, -1)),
    *[Tensor(name.upper(), t.dtype, t.dims) for t in LLM_OUTPUTS for name in [t.name] if name in PASS_THROUGH],
]
POST_OUTPUTS = [
    Tensor("OUTPUT", "STRING", (-1,)),  # one string per request (and beam): shape [1]
    *[Tensor("OUT_" + name.upper(), t.dtype, t.dims) for t in LLM_OUTPUTS for name in [t.name]
      if name in PASS_THROUGH],
]
ENSEMBLE_INPUTS = [_ensemble_input(f) for f in REQUEST_FIELDS]
ENSEMBLE_OUTPUTS = [
    Tensor("text_output", "STRING", (-1,)),
    *[Tensor(name, t.dtype, t.dims) for t in LLM_OUTPUTS for name in [t.name] if name in PASS_THROUGH],
]
MODEL_TENSORS = {
    PRE: (PRE_INPUTS, PRE_OUTPUTS),
    LLM: (LLM_INPUTS, LLM_OUTPUTS),
    POST: (POST_INPUTS, POST_OUTPUTS),
    "ensemble": (ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS),
}

# ---- the ensemble's wiring: (model, {model input: ensemble tensor}, {model output: ensemble tensor}) ------
PRE_TO_LLM = {"INPUT_ID": "input_ids", "STOP_WORDS_IDS": "stop_words_list", "BAD_WORDS_IDS": "bad_words_list"}
# llm fields preprocessing also reads, as in tensorrtllm_backend's ensemble: then a request with them but without
# text_input still reaches preprocessing, which refuses it naming text_input.
PRE_ALSO_READS = {"REQUEST_OUTPUT_LEN": "max_tokens", "END_ID": "end_id"}
# What NVIDIA's tensorrt_llm model (r25.05) declares, for an ensemble with it in front of our postprocessing:
# pass these to ensemble_steps / ensemble_tensors and the ensemble keeps only what that model reads and writes.
OFFICIAL_LLM_INPUTS = frozenset({
    "input_ids", "input_lengths", "request_output_len", "num_return_sequences", "end_id", "pad_id",
    "stop_words_list", "bad_words_list", "beam_width", "temperature", "runtime_top_k", "runtime_top_p",
    "len_penalty", "repetition_penalty", "min_length", "presence_penalty", "frequency_penalty", "random_seed",
    "return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics",
    "exclude_input_in_output", "streaming", "guided_decoding_guide_type", "guided_decoding_guide"})
OFFICIAL_LLM_OUTPUTS = frozenset({
    "output_ids", "sequence_length", "cum_log_probs", "output_log_probs", "batch_index", "sequence_index",
    "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
    "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "acceptance_rate",
    "total_accepted_draft_tokens", "total_draft_tokens"})


def _llm_fields(llm_inputs: frozenset[str] | None) -> list[Field]:
    return [f for f in REQUEST_FIELDS if f.reader != LLM or llm_inputs is None or f.model_input in llm_inputs]


def _passed(llm_outputs: frozenset[str] | None) -> list[str]:
    return [name for name in PASS_THROUGH if llm_outputs is None or name in llm_outputs]


def ensemble_tensors(llm_inputs: frozenset[str] | None = None,
                     llm_outputs: frozenset[str] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The ensemble's inputs and outputs; with the middle model's tensor names given, only what it has."""
    inputs = [_ensemble_input(f) for f in _llm_fields(llm_inputs)]
    passed = set(_passed(llm_outputs))
    return inputs, [t for t in ENSEMBLE_OUTPUTS if t.name == "text_output" or t.name in passed]


def ensemble_steps(llm_inputs: frozenset[str] | None = None,
                   llm_outputs: frozenset[str] | None = None) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """The three steps; ``llm_inputs``/``llm_outputs``: the middle model's tensor names (default: our llm's)."""
    fields, passed = _llm_fields(llm_inputs), _passed(llm_outputs)
    pre_in = {f.model_input: f.name for f in fields if f.reader == PRE}
    pre_in.update({key: name for key, name in PRE_ALSO_READS.items() if name in {f.name for f in fields}})
    pre_out = {out: f"_{out}" for out in PRE_TO_LLM}
    llm_in = {f.model_input: f.name for f in fields if f.reader == LLM}
    llm_in.update({llm_name: f"_{pre_name}" for pre_name, llm_name in PRE_TO_LLM.items()})
    llm_out = {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}
    post_in = {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"}
    if llm_outputs is None or "context_ids" in llm_outputs:
        llm_out["context_ids"] = post_in["CONTEXT_IDS"] = "_CONTEXT_IDS"
    llm_out.update({name: f"_{name.upper()}" for name in passed})
    post_in.update({name.upper(): f"_{name.upper()}" for name in passed})
    post_out = {"OUTPUT": "text_output", **{f"OUT_{name.upper()}": name for name in passed}}
    return [(PRE, pre_in, pre_out), (LLM, llm_in, llm_out), (POST, post_in, post_out)]

"""The request path without tritonserver: llm input parsing, response assembly, pre/postprocessing.

Real tokenizer and engine directory (``build/smollm2``); the Triton models are thin adapters over exactly
these functions, so what is checked here is what the server does.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import ENGINE_DIR, require_engine

from scalellm.engine.sequence import RequestOutput
from scalellm.tokenization import load_tokenizer
from scalellm.triton import response
from scalellm.triton.contract import LLM_FIELDS
from scalellm.triton.postprocess import postprocess
from scalellm.triton.preprocess import Preprocessor
from scalellm.triton.request import EngineLimits, parse
from scalellm.triton.tensors import InvalidInput

MAX_MODEL_LEN = 64


def fits(prompt_len: int, max_tokens: int) -> str | None:
    """LLMEngine.check_fits's rule for a 64-token context."""
    total = prompt_len + max_tokens
    return None if total <= MAX_MODEL_LEN else f"prompt ({prompt_len}) + max_tokens ({max_tokens}) > {MAX_MODEL_LEN}"


LIMITS = EngineLimits(vocab_size=100, eos_token_ids=(2,), check_fits=fits, max_model_len=MAX_MODEL_LEN,
                      decoupled=True, block_size=16)


def inputs(**values: object):
    """A ``get`` over llm inputs given as Python values, shaped [1, 1] (or [1, n]) like Triton's."""
    arrays = {}
    for name, value in values.items():
        array = np.asarray(value)
        arrays[name] = array.reshape(1, -1) if array.ndim <= 1 else array[None]
    return arrays.get


def test_defaults_come_from_the_contract() -> None:
    request = parse(inputs(input_ids=[5, 6, 7]), LIMITS)
    (params,) = request.samples
    assert params.max_tokens == LLM_FIELDS["request_output_len"].default
    assert params.greedy and (params.temperature, params.top_k) == (1.0, 1)  # TensorRT-LLM: k 0, p 0 = greedy
    assert params.stop_token_ids == (2,)  # no end_id: the model's end tokens
    assert not request.stream and not request.exclude_input  # TensorRT-LLM: the prompt is echoed
    assert not request.perf_metrics and not request.num_input_tokens
    assert request.stream_interval is None  # the llm's stream_interval parameter applies
    assert parse(inputs(input_ids=[5], stream_interval=4), LIMITS).stream_interval == 4


@pytest.mark.parametrize(("given", "greedy", "top_k", "top_p"), [
    ({}, True, 1, 1.0),  # neither: greedy, whatever the temperature
    ({"temperature": np.float32(0.8)}, True, 1, 1.0),  # temperature alone does not sample
    ({"runtime_top_p": np.float32(0.0), "runtime_top_k": np.int32(0)}, True, 1, 1.0),
    ({"runtime_top_k": np.int32(5)}, False, 5, 1.0),  # pure top-k
    ({"runtime_top_p": np.float32(0.5)}, False, 0, 0.5),  # pure top-p
    ({"runtime_top_p": np.float32(1.0)}, False, 0, 1.0),  # the whole distribution
    ({"runtime_top_k": np.int32(5), "runtime_top_p": np.float32(0.5)}, False, 5, 0.5),
    ({"runtime_top_k": np.int32(1), "runtime_top_p": np.float32(0.5)}, True, 1, 0.5),
    ({"runtime_top_p": np.float32(0.5), "temperature": np.float32(0.0)}, True, 0, 0.5),
])
def test_sampling_follows_tensorrt_llms_rule(given: dict, greedy: bool, top_k: int, top_p: float) -> None:
    (params,) = parse(inputs(input_ids=[5], **given), LIMITS).samples
    assert (params.greedy, params.top_k, params.top_p) == (greedy, top_k, pytest.approx(top_p))


def test_top_p_out_of_range_is_refused() -> None:
    for bad in (-0.5, 1.5):
        with pytest.raises(InvalidInput, match="top_p"):
            parse(inputs(input_ids=[5], runtime_top_p=np.float32(bad)), LIMITS)


def test_end_id_is_decided_here() -> None:
    assert parse(inputs(input_ids=[5], end_id=7), LIMITS).samples[0].stop_token_ids == (7,)
    assert parse(inputs(input_ids=[5], end_id=-1), LIMITS).samples[0].stop_token_ids == ()
    with pytest.raises(InvalidInput, match="end_id"):
        parse(inputs(input_ids=[5], end_id=100), LIMITS)


def test_num_return_sequences_get_their_own_seeds() -> None:
    request = parse(inputs(input_ids=[5], num_return_sequences=3, random_seed=np.uint64(41),
                           temperature=np.float32(0.8)), LIMITS)
    assert [p.seed for p in request.samples] == [41, 42, 43]
    with pytest.raises(InvalidInput, match="decoupled"):
        parse(inputs(input_ids=[5], num_return_sequences=3), EngineLimits(**{**LIMITS.__dict__, "decoupled": False}))
    with pytest.raises(InvalidInput, match="stream"):
        parse(inputs(input_ids=[5], streaming=True), EngineLimits(**{**LIMITS.__dict__, "decoupled": False}))


@pytest.mark.parametrize(("values", "names"), [
    ({"request_output_len": 0}, ["max_tokens", "0"]),
    ({"request_output_len": 100}, ["max_tokens", "100"]),
    ({"input_ids": list(range(1, 65))}, ["text_input"]),
    ({"input_ids": [5, 500]}, ["input_ids", "100"]),
    ({"input_lengths": 4}, ["input_lengths", "4"]),
    ({"beam_width": 2}, ["beam_width", "2"]),
    ({"temperature": np.float32(-1)}, ["temperature"]),
    ({"min_length": 20, "request_output_len": 10}, ["min_tokens", "20"]),
    ({"return_context_logits": True}, ["return_context_logits", "not supported"]),
    ({"guided_decoding_guide_type": b"json"}, ["guided_decoding_guide_type", "not supported"]),
    ({"stream_interval": 0}, ["stream_interval", ">= 1", "0"]),
    ({"stream_interval": -4, "streaming": True}, ["stream_interval", ">= 1", "-4"]),
])
def test_bad_input_is_refused_naming_the_field(values: dict, names: list[str]) -> None:
    with pytest.raises(InvalidInput) as error:
        parse(inputs(**{"input_ids": [5, 6], **values}), LIMITS)
    assert all(name in str(error.value) for name in names), str(error.value)


def test_false_flags_of_unimplemented_features_are_fine() -> None:
    parse(inputs(input_ids=[5], return_context_logits=False, return_generation_logits=False), LIMITS)


@pytest.fixture(scope="module")
def tokenizer():
    require_engine()
    return load_tokenizer(ENGINE_DIR)


def outputs(tokens: list[int], step: int) -> list[RequestOutput]:
    """What the engine reports for ``tokens`` generated ``step`` at a time."""
    outs = []
    for start in range(0, len(tokens), step):
        done = start + step >= len(tokens)
        outs.append(RequestOutput("r", tokens[start:start + step], min(start + step, len(tokens)),
                                  "length" if done else None, new_log_probs=[-0.5] * len(tokens[start:start + step])))
    return outs


@pytest.mark.parametrize("text", [" café crème 🎉🚀", " 你好，世界", " plain words  with spaces"])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("interval", [1, 2, 3])
def test_responses_in_official_shapes_detokenise_byte_exactly(tokenizer, text: str, exclude: bool,
                                                              interval: int) -> None:
    """Whichever tokens a response holds (``stream_interval``: 2 or 3 at a time, splitting characters)."""
    prompt = tokenizer.encode("Say:").ids
    tokens = tokenizer.encode(text, add_special_tokens=False).ids
    texts = {}
    for stream in (True, False):
        request = parse(inputs(input_ids=prompt, streaming=stream, exclude_input_in_output=exclude,
                               return_log_probs=True, request_output_len=len(tokens)),
                        EngineLimits(**{**LIMITS.__dict__, "vocab_size": 50000}))
        seq = response.start(request, 0, interval)
        pieces, finishes = [], []
        for out in outputs(tokens, step=1):
            if not seq.pacer.add(out) and not seq.pacer.due():  # as the llm's sender does, keeping up
                continue
            tensors = response.tensors(request, seq, seq.pacer.take(), LIMITS.block_size)
            if tensors is None:
                continue
            assert tensors["output_ids"].shape[:2] == (1, 1)  # [batch, beam, tokens]
            assert tensors["sequence_length"].tolist() == [[tensors["output_ids"].shape[2]]]
            assert "arrival_time_ns" not in tensors and "num_input_tokens" not in tensors
            finishes.append(tensors["finish_reason"].item().decode() if "finish_reason" in tensors else "")
            names = {n.upper(): v for n, v in tensors.items()}
            post = postprocess(tokenizer, lambda n, names=names: names.get(
                {"TOKENS_BATCH": "OUTPUT_IDS", "CONTEXT_IDS": "CONTEXT_IDS"}.get(n, n)))
            assert post["OUTPUT"].shape == (1,)  # one string per request: text_output[0].decode()
            pieces.append(post["OUTPUT"][0].decode())
        assert tensors["cum_log_probs"].tolist() == [[pytest.approx(-0.5 * len(tokens))]]
        assert finishes == [""] * (len(finishes) - 1) + ["length"]  # only the last response carries it
        texts[stream] = "".join(pieces)
    assert texts[True] == text  # streaming never repeats the prompt
    assert texts[False] == (text if exclude else tokenizer.decode(prompt) + text)


def test_postprocessing_reads_the_official_model_alone(tokenizer) -> None:
    """NVIDIA's tensorrt_llm in front: only TOKENS_BATCH and SEQUENCE_LENGTH, padded past the length."""
    ids = tokenizer.encode("Hello there", add_special_tokens=False).ids
    get = {"TOKENS_BATCH": np.asarray([[ids + [0, 0]]], dtype=np.int32),
           "SEQUENCE_LENGTH": np.asarray([[len(ids)]], dtype=np.int32)}.get
    out = postprocess(tokenizer, get)
    assert out["OUTPUT"].tolist() == [b"Hello there"] and list(out) == ["OUTPUT"]


@pytest.mark.parametrize(("inputs", "message"), [
    ({"SEQUENCE_LENGTH": [[2]]}, "TOKENS_BATCH is required"),
    ({"TOKENS_BATCH": [[[5, 6]]]}, "SEQUENCE_LENGTH is required"),
    ({"TOKENS_BATCH": np.zeros((1, 0, 0)), "SEQUENCE_LENGTH": [[0]]}, "TOKENS_BATCH must be"),
    ({"TOKENS_BATCH": [[[5, 6]]], "SEQUENCE_LENGTH": np.zeros((1, 0))}, "SEQUENCE_LENGTH must hold one length"),
])
def test_postprocessing_refuses_what_it_cannot_read(tokenizer, inputs: dict, message: str) -> None:
    get = {k: np.asarray(v, dtype=np.int32) for k, v in inputs.items()}.get
    with pytest.raises(InvalidInput, match=message):
        postprocess(tokenizer, get)


def test_preprocessing_tokenises_and_applies_the_chat_template() -> None:
    pre = Preprocessor(ENGINE_DIR)

    def run(**values: object) -> dict[str, np.ndarray]:
        return pre({k.upper(): np.asarray([[v.encode() if isinstance(v, str) else v]],
                                          dtype=object if isinstance(v, str) else None)
                    for k, v in values.items()}.get)

    plain = run(query="What is the capital of France?")
    chat = run(query="What is the capital of France?", apply_chat_template=True)
    text = pre.tokenizer.decode(chat["INPUT_ID"][0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert chat["INPUT_ID"].shape[1] > plain["INPUT_ID"].shape[1] == plain["REQUEST_INPUT_LEN"][0, 0]
    assert plain["OUT_END_ID"].tolist() == [[2]] and plain["DECODER_INPUT_ID"].shape == (1, 1)
    with pytest.raises(InvalidInput, match="text_input"):
        run(query="")
    with pytest.raises(InvalidInput, match=re.escape("text_input (QUERY) is required")):
        run(request_output_len=4)
    with pytest.raises(InvalidInput, match="embedding_bias_words"):
        pre({"QUERY": np.asarray([[b"hi"]], dtype=object),
             "EMBEDDING_BIAS_WORDS": np.asarray([[b"x"]], dtype=object)}.get)

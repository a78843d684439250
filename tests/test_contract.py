"""The request contract (scalellm/triton/contract.py) is consistent, rendered faithfully, and shared.

No server: ``tests/test_server_compat.py`` checks that Triton loads exactly these configs.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

from build_engines import DEFAULT_TEMPLATES, model_templates, model_values, substitute
from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
from scalellm.models.engine_meta import EngineMeta
from scalellm.triton.contract import (
    ENSEMBLE_INPUTS,
    MODEL_TENSORS,
    OFFICIAL_LLM_INPUTS,
    OFFICIAL_LLM_OUTPUTS,
    REQUEST_FIELDS,
    ensemble_steps,
    ensemble_tensors,
)
from scalellm.triton.params import default_parameters, engine_config
from scalellm_client._request import INPUT_DTYPES, SAMPLING_INPUTS

CLIENT_TYPES = {"BYTES": "STRING"}  # the client names Triton's wire type, configs the model type


def test_the_clients_request_table_matches_the_contract() -> None:
    """scalellm_client keeps its own torch-free table: each input it can send is declared, same type."""
    declared = {t.name: t.dtype for t in ENSEMBLE_INPUTS}
    for name, dtype in INPUT_DTYPES.items():
        assert name in declared, f"the client sends {name!r}, which the contract does not declare"
        assert declared[name] == CLIENT_TYPES.get(dtype, dtype), name
    refused = {f.name for f in REQUEST_FIELDS if f.refused}
    assert not refused & {name for name, _ in SAMPLING_INPUTS.values()}, "the client offers a refused field"


def test_the_ensemble_wires_every_tensor() -> None:
    produced = {t.name for t in ENSEMBLE_INPUTS}
    readers: dict[str, int] = {}
    for model, inputs, outputs in ensemble_steps():
        model_inputs, model_outputs = (dict((t.name, t) for t in ts) for ts in MODEL_TENSORS[model])
        for key, tensor in inputs.items():
            assert key in model_inputs, f"{model} has no input {key}"
            assert tensor in produced, f"{model}.{key} reads {tensor}, which nothing before it produces"
            readers[tensor] = readers.get(tensor, 0) + 1
            if not model_inputs[key].optional:  # a step's non-optional input: an output of a step before, or
                # an input the step refuses naming it (a non-optional ensemble input would block the step instead)
                assert model_inputs[key].required and (tensor.startswith("_") or tensor in {
                    t.name for t in ENSEMBLE_INPUTS if t.required}), f"{model}.{key}"
        for key, tensor in outputs.items():
            assert key in model_outputs, f"{model} has no output {key}"
            produced.add(tensor)
    assert all(readers.get(t.name) for t in ENSEMBLE_INPUTS), "Triton refuses an ensemble input no step reads"
    assert all(t.optional for t in ENSEMBLE_INPUTS), "a missing non-optional ensemble input stalls the ensemble"
    for model, (inputs, _) in MODEL_TENSORS.items():  # Triton refuses a request with no inputs, naming these
        assert model == "ensemble" or any(not t.optional and t.required for t in inputs), model
    assert {t.name for t in MODEL_TENSORS["ensemble"][1]} <= produced


def parse_io(text: str) -> dict[str, list[tuple[str, str, str, bool]]]:
    sections = {}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", text, re.MULTILINE | re.DOTALL).group(1)
        sections[kind] = [(m[0], m[1], m[2].replace(" ", ""), bool(m[3])) for m in re.findall(
            r'name: "(\w+)"\s*data_type: TYPE_(\w+)\s*dims: \[([^\]]*)\](\s*optional: true)?', block)]
    return sections


def test_templates_render_the_contract() -> None:
    values = {"engine_dir": "../engine", "max_batch_size": "64", "llm_instance_count": "1",
              "decoupled_mode": "true", "llm_model_name": "llm", **default_parameters()}
    for template in model_templates(DEFAULT_TEMPLATES):
        text = substitute((template / "config.pbtxt").read_text(), model_values(template.name, values), template)
        inputs, outputs = MODEL_TENSORS[template.name]
        rendered = parse_io(text)
        assert rendered["input"] == [(t.name, t.dtype, ",".join(map(str, t.dims)), t.optional) for t in inputs]
        assert [r[:3] for r in rendered["output"]] == [(t.name, t.dtype, ",".join(map(str, t.dims))) for t in outputs]


def test_engine_defaults_live_once() -> None:
    """The llm template's parameters default to scalellm/config.py's values, and read back to them."""
    unrecorded = EngineMeta()
    config = engine_config(default_parameters(), Path("engine"), unrecorded)
    assert config.cache == CacheConfig() and config.scheduler == SchedulerConfig()
    assert (config.device, config.dtype, config.num_threads) == (EngineConfig.device, EngineConfig.dtype, None)
    assert config.unquantized_prompts == EngineConfig.unquantized_prompts
    off = engine_config({**default_parameters(), "unquantized_prompts": "0"}, Path("engine"), unrecorded)
    assert not off.unquantized_prompts
    overridden = engine_config({**default_parameters(), "max_num_seqs": "8"}, Path("engine"),
                               EngineMeta(max_model_len=99))
    assert (overridden.scheduler.max_num_seqs, overridden.scheduler.max_model_len) == (8, 99)
    llm = (DEFAULT_TEMPLATES / "llm" / "config.pbtxt").read_text()
    placeholders = set(re.findall(r'key: "(\w+)" value: \{ string_value: "\$\{\1\}"', llm))
    assert placeholders == {"engine_dir", *default_parameters()}


def test_docs_describe_every_request_field() -> None:
    docs = (ROOT / "docs" / "ensemble.md").read_text()
    missing = [f.name for f in REQUEST_FIELDS if f"`{f.name}`" not in docs]
    assert not missing, f"docs/ensemble.md does not describe {missing}"


def test_an_ensemble_around_nvidias_tensorrt_llm_reads_only_what_it_declares() -> None:
    """The GPU path puts NVIDIA's tensorrt_llm between our preprocessing and postprocessing."""
    inputs, outputs = ensemble_tensors(OFFICIAL_LLM_INPUTS, OFFICIAL_LLM_OUTPUTS)
    steps = ensemble_steps(OFFICIAL_LLM_INPUTS, OFFICIAL_LLM_OUTPUTS)
    (_, llm_in, llm_out) = steps[1]
    assert set(llm_in) <= OFFICIAL_LLM_INPUTS and set(llm_out) <= OFFICIAL_LLM_OUTPUTS
    assert {"min_p", "seed", "apply_chat_template"} & {t.name for t in inputs} == {"apply_chat_template"}
    assert "finish_reason" not in {t.name for t in outputs} and "text_output" in {t.name for t in outputs}
    post_inputs = {t.name for t in MODEL_TENSORS["postprocessing"][0]}
    assert set(steps[2][1]) <= post_inputs and "CONTEXT_IDS" not in steps[2][1]
    wired = {tensor for _, ins, _ in steps for tensor in ins.values()}
    assert all(t.name in wired for t in inputs), "Triton refuses an ensemble input no step reads"

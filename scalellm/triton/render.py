"""Render the contract table (``contract.py``) as config.pbtxt text: input/output sections and ensemble steps.

``build_engines.py`` fills a template's ``${io}`` with :func:`io_section` and the ensemble's
``${ensemble_steps}`` with :func:`ensemble_section`.  Pure string building, no Triton needed.
"""

from __future__ import annotations

from scalellm.triton.contract import LLM, MODEL_TENSORS, Tensor, ensemble_steps, ensemble_tensors


def _tensor(t: Tensor) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    optional = "\n    optional: true" if t.optional else ""
    return f'  {{\n    name: "{t.name}"\n    data_type: TYPE_{t.dtype}\n    dims: [ {dims} ]{optional}\n  }}'


def _block(kind: str, tensors: list[Tensor], outputs: bool) -> str:
    if outputs:  # outputs have no "optional" in Triton's schema
        tensors = [Tensor(t.name, t.dtype, t.dims, optional=False) for t in tensors]
    return f"{kind} [\n" + ",\n".join(_tensor(t) for t in tensors) + "\n]"


def io_section(model: str, llm_inputs: frozenset[str] | None = None,
               llm_outputs: frozenset[str] | None = None) -> str:
    """The ``input [...]`` and ``output [...]`` blocks of ``model`` (preprocessing, llm, postprocessing, ensemble).

    For the ensemble, ``llm_inputs``/``llm_outputs`` name the middle model's tensors when it is not ours
    (e.g. ``contract.OFFICIAL_LLM_INPUTS`` / ``OFFICIAL_LLM_OUTPUTS`` for NVIDIA's tensorrt_llm).
    """
    inputs, outputs = ensemble_tensors(llm_inputs, llm_outputs) if model == "ensemble" else MODEL_TENSORS[model]
    return _block("input", inputs, outputs=False) + "\n" + _block("output", outputs, outputs=True)


def ensemble_section(llm_model_name: str = LLM, llm_inputs: frozenset[str] | None = None,
                     llm_outputs: frozenset[str] | None = None) -> str:
    """``ensemble_scheduling { step [...] }`` wiring preprocessing -> llm -> postprocessing."""
    steps = []
    for model, inputs, outputs in ensemble_steps(llm_inputs, llm_outputs):
        name = llm_model_name if model == LLM else model
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
        steps.append(f'    {{\n      model_name: "{name}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }")
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}"

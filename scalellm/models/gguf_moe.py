"""Mixtral GGUF files, which transformers (5.24) reads wrongly: it loses the experts.

llama.cpp writes a Mixtral as architecture "llama" plus ``llama.expert_count`` / ``llama.expert_used_count``
and, per layer, the router ``blk.N.ffn_gate_inp`` [E, H] and the stacked experts ``blk.N.ffn_gate_exps``,
``ffn_up_exps`` [E, I, H] and ``ffn_down_exps`` [E, H, I] (files from before 2024 have one
``blk.N.ffn_{gate,up,down}.E`` per expert instead). transformers' GGUF loader has no mapping for any of these
under "llama": it builds a dense LlamaConfig, skips the expert tensors and leaves every MLP randomly
initialised, with only a load-report warning.

So transformers still reads what it reads right (config, tokenizer, attention/norm/embedding tensors with
llama.cpp's q/k permutation undone) and this module adds the experts, dequantised with ``gguf``, in Mixtral's
Hugging Face layout (``block_sparse_moe.gate``, ``block_sparse_moe.experts.{e}.w1/w3/w2`` = gate/up/down).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIXTRAL_GGUF_ARCHITECTURES = ("llama",)
ROUTER = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight")
EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)(?:_exps|\.(\d+))\.weight")  # stacked | one per expert
HF_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


def open_gguf(path: str | Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field(reader: Any, name: str) -> Any:
    field = reader.get_field(name)
    return None if field is None else field.contents()


def expert_counts(reader: Any) -> tuple[int, int]:
    """(experts, experts per token) of a llama-architecture GGUF; (0, 0) for a dense one or another arch."""
    arch = _field(reader, "general.architecture")
    if arch not in MIXTRAL_GGUF_ARCHITECTURES:
        return 0, 0
    return int(_field(reader, f"{arch}.expert_count") or 0), int(_field(reader, f"{arch}.expert_used_count") or 0)


def _tensor(t: Any) -> torch.Tensor:
    from gguf import dequantize

    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # owned copy


def read_experts(reader: Any, num_experts: int) -> dict[str, torch.Tensor]:
    """Router and expert tensors with Mixtral's HF names, float32, one storage each."""
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if m := ROUTER.fullmatch(t.name):
            out[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = _tensor(t)
        elif m := EXPERTS.fullmatch(t.name):
            layer, kind, expert = m[1], m[2], m[3]
            weights = _tensor(t)
            per_expert = {int(expert): weights} if expert is not None else dict(enumerate(weights.unbind(0)))
            for e, w in per_expert.items():
                out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{HF_NAMES[kind]}.weight"] = w.clone()
    wanted = num_experts * 3 + 1  # per layer
    layers = {name.split(".")[2] for name in out}
    if not out or len(out) != wanted * len(layers):
        raise ValueError(f"expert tensors do not match expert_count={num_experts}: found {len(out)} tensors "
                         f"over {len(layers)} layers, expected {wanted} per layer")
    return out


def to_mixtral(
    reader: Any, config: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """transformers' dense reading of a Mixtral GGUF (config dict, state dict) -> Mixtral's, experts added."""
    from scalellm.models.upcycle import mixtral_config

    num_experts, top_k = expert_counts(reader)
    experts = read_experts(reader, num_experts)
    dense = {name: tensor for name, tensor in state_dict.items() if ".mlp." not in name}  # random-initialised
    moe_config = mixtral_config(config, num_experts, top_k)
    moe_config["sliding_window"] = None  # llama.cpp runs the llama architecture without one
    return moe_config, {**dense, **experts}

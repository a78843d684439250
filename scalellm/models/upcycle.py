"""Sparse upcycling: a dense Llama/Mistral checkpoint -> a Mixtral whose every expert is a copy of the MLP.

With N identical experts any top-k mix whose routing weights are renormalised to sum to 1 returns the dense
MLP's output (up to float rounding), so the MoE model must reproduce the dense model's outputs: a free oracle
for the whole MoE path (routing, grouping by expert, scatter, weighted sum, loading).

The router is ours to choose. It is random so that routing really varies across tokens and every expert gets
work: each layer's ``block_sparse_moe.gate.weight`` [N, hidden] is drawn from normal(0, ROUTER_STD) by a
``torch.Generator`` seeded with ROUTER_SEED, layer 0 first, so a build is reproducible.

The result uses Mixtral's Hugging Face layout (``model.layers.{i}.block_sparse_moe.gate.weight`` and
``...experts.{e}.w1/w2/w3.weight`` = gate/down/up), the one transformers' MixtralForCausalLM loads and saves.
"""

from __future__ import annotations

from typing import Any

import torch

ROUTER_SEED = 0
ROUTER_STD = 0.02
TOP_K = 2
UPCYCLABLE = ("llama", "mistral")
# Llama config keys Mixtral has no counterpart for: only their neutral values can be dropped.
DENSE_ONLY_KEYS = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
MLP_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def mixtral_config(dense: dict[str, Any], num_experts: int, top_k: int = TOP_K) -> dict[str, Any]:
    """The dense HF config dict as a Mixtral one: same sizes, rope, norms, ids, tying; N experts, top-k."""
    if dense.get("model_type") not in UPCYCLABLE:
        raise ValueError(f"expected a dense {'/'.join(UPCYCLABLE)} config (got {dense.get('model_type')!r})")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= experts per token ({top_k}) <= experts ({num_experts})")
    for key, neutral in DENSE_ONLY_KEYS.items():
        if dense.get(key, neutral) != neutral:
            raise ValueError(f"cannot express {key}={dense[key]!r} in a Mixtral config")
    config = {k: v for k, v in dense.items() if k not in DENSE_ONLY_KEYS}
    config.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    config.setdefault("sliding_window", None)
    return config


def mixtral_state_dict(
    dense: dict[str, torch.Tensor], num_layers: int, num_experts: int, seed: int = ROUTER_SEED
) -> dict[str, torch.Tensor]:
    """Each layer's mlp.{gate,up,down}_proj copied into N experts (the same tensor N times) + a random router."""
    expected = {f"model.layers.{i}.mlp.{name}.weight" for i in range(num_layers) for name in MLP_NAMES}
    extra = sorted(name for name in dense if ".mlp." in name and name not in expected)
    if extra:
        raise ValueError(f"dense MLP tensors an expert cannot hold: {extra[:5]}")
    generator = torch.Generator().manual_seed(seed)
    out = {name: tensor for name, tensor in dense.items() if ".mlp." not in name}
    for i in range(num_layers):
        pre = f"model.layers.{i}"
        mlp = {name: dense.get(f"{pre}.mlp.{name}.weight") for name in MLP_NAMES}
        if any(t is None for t in mlp.values()):
            raise ValueError(f"{pre}.mlp: expected gate_proj, up_proj, down_proj weights")
        hidden = mlp["gate_proj"].shape[1]
        router = torch.randn(num_experts, hidden, generator=generator) * ROUTER_STD
        out[f"{pre}.block_sparse_moe.gate.weight"] = router.to(mlp["gate_proj"].dtype)
        for e in range(num_experts):
            for name, w in MLP_NAMES.items():
                out[f"{pre}.block_sparse_moe.experts.{e}.{w}.weight"] = mlp[name]
    return out


def upcycle(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor], num_experts: int, seed: int = ROUTER_SEED
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(Mixtral config dict, Mixtral HF-layout state dict) from a dense checkpoint's."""
    moe_config = mixtral_config(config, num_experts)
    return moe_config, mixtral_state_dict(state_dict, config["num_hidden_layers"], num_experts, seed)

"""Llama / Mistral / Mixtral decoder: RMSNorm, RoPE, GQA attention over a paged KV cache, and a SwiGLU MLP (dense)
or a sparse mixture of SwiGLU experts (Mixtral, ``cfg.num_experts > 0``).

Its matmuls are the linear layers of scalellm/models/linear.py (one class per weight format), the rest the layer
ops (scalellm/models/layer_ops.py: torch or our CPU kernels), both chosen once, at load; a forward has one path.
Weights use Hugging Face tensor names; q/k/v and gate/up are fused at load time so each layer runs
three GEMMs instead of five over the step's flat token batch; Mixtral's per-expert w1/w3 and w2 are stacked
into 3-D tensors (see scalellm/models/moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from scalellm.config import ModelConfig
from scalellm.models.layer_ops import KernelOps, LayerOps, TorchOps
from scalellm.models.linear import Q8, Linear
from scalellm.models.moe import SparseMoE
from scalellm.models.step import RowSplit, Step

# transformers 5 holds Mixtral's MoE in memory as mlp.gate / mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then
# up) / mlp.experts.down_proj [E, H, I] (its save_pretrained converts back to per-expert w1/w2/w3): same layout
# as ours, other names.
FUSED_MOE_NAMES = {
    ".mlp.gate.weight": ".block_sparse_moe.gate.weight",
    ".mlp.experts.gate_up_proj": ".block_sparse_moe.w13",
    ".mlp.experts.down_proj": ".block_sparse_moe.w2",
}


class RMSNorm(nn.Module):
    """The norm's weight and epsilon; the arithmetic is the layer ops' (``LayerOps.norm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin table, indexed by absolute position (HF's rotate-half layout)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size)
        self.o_proj = Linear(q_size, cfg.hidden_size)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: object, kv_cache: torch.Tensor, step: Step) -> torch.Tensor:
        o = self.ops.attention(self.qkv_proj(x, step.rows), rope, kv_cache, step, self.num_heads, self.num_kv_heads,
                               self.scale)
        return self.o_proj(o, step.rows)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, hidden: int, intermediate: int, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor, rows: RowSplit) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x, rows)), rows)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.num_experts > 0
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, ops
            )
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, ops)

    def forward(self, x: torch.Tensor, rope: object, kv_cache: torch.Tensor, step: Step) -> torch.Tensor:
        """x: the residual stream, this forward's own tensor: updated in place and returned."""
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = self.ops.norm(x, norm1.weight, norm1.eps)
        h = self.ops.add_norm(x, self.self_attn(h, rope, kv_cache, step), norm2.weight, norm2.eps)
        return x.add_(ffn(h, step.rows))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.ops = ops or TorchOps()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.stack: object | None = None  # the layers in one kernel call (fuse_layers), for all-generated steps

    def fuse_layers(self) -> bool:
        """Run the decoder layers as one call of our kernels (kernels/decoder.cpp's DecoderStack) in steps whose
        rows all take the generated path, where every layer is dense with int8 / int4 linears on ``q_q8_mm`` and
        the layer ops are ours: the same kernels in the same order, so the same bits, without ~10 Python calls
        per layer (a fifth of a step at one sequence). Returns whether it does."""
        ops, layers = self.ops, list(self.layers)
        if not isinstance(ops, KernelOps) or not hasattr(ops.ops, "DecoderStack"):
            return False
        linears = [[layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
                   for layer in layers if not layer.is_moe]
        if len(linears) < len(layers) or not all(isinstance(getattr(lin, "generated", None), Q8)
                                                 for row in linears for lin in row):
            return False
        attn = layers[0].self_attn
        stack = ops.ops.DecoderStack(attn.num_heads, attn.num_kv_heads, attn.scale, ops.bf16_dot)
        for layer, row in zip(layers, linears, strict=True):
            q8 = [(lin.generated.wq, lin.generated.d, lin.generated.m, lin.generated.n, lin.generated.bits)
                  for lin in row]
            stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                            layer.input_layernorm.eps, *q8)
        self.stack = stack
        return True

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] the step's tokens, all sequences flattened
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        step: Step,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.ops.rope_inputs(self.rope.cos, self.rope.sin, positions, x.dtype)
        if self.stack is not None and not (step.rows.all_prompt or step.rows.mixed):
            (rows,) = step.queries  # in place: one group
            x = self.stack.forward(x, kv_caches, *rope, step.slot_mapping, rows.blocks, rows.lengths, step.block_size)
            return self.ops.norm(x, self.norm.weight, self.norm.eps)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, kv_cache, step)
        return self.ops.norm(x, self.norm.weight, self.norm.eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, rows: RowSplit) -> torch.Tensor:
        """Float32 logits of the hidden states of the rows that sample (``rows``: which of them are a prompt's)."""
        return self.lm_head(hidden, rows).float()

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load HF-named weights (``model.layers.0.self_attn.q_proj.weight`` ...), fusing q/k/v and gate/up.

        Mixtral: ``block_sparse_moe.gate`` is the router; ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up,
        down: the layout of real checkpoints and of transformers' save_pretrained) are stacked into
        ``w13``/``w2``; transformers' fused ``mlp.experts.gate_up_proj``/``down_proj`` are taken as they are.
        """
        sd = {_fused_moe_name(k.removeprefix("model.")): v for k, v in sd.items()}
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        ours: dict[str, torch.Tensor] = {}
        for name, tensor in sd.items():
            if ".self_attn.q_proj." in name:
                pre = name.split(".q_proj.")[0]
                ours[f"{pre}.qkv_proj.weight"] = torch.cat(
                    [tensor, sd[f"{pre}.k_proj.weight"], sd[f"{pre}.v_proj.weight"]], dim=0
                )
            elif ".mlp.gate_proj." in name:
                pre = name.split(".gate_proj.")[0]
                ours[f"{pre}.gate_up_proj.weight"] = torch.cat([tensor, sd[f"{pre}.up_proj.weight"]], dim=0)
            elif name.endswith(".block_sparse_moe.experts.0.w1.weight"):
                pre = name.removesuffix(".experts.0.w1.weight")
                ours[f"{pre}.w13"], ours[f"{pre}.w2"] = _stack_experts(sd, pre, self.config.num_experts)
            elif not any(s in name for s in (".k_proj.", ".v_proj.", ".up_proj.", "rotary_emb", ".experts.")):
                ours[name] = tensor
        missing, unexpected = self.load_state_dict(ours, strict=False, assign=assign)
        missing = [m for m in missing if not m.startswith("rope.")]
        if missing or unexpected:
            raise ValueError(f"weights do not match the model: missing={missing} unexpected={unexpected}")


def _fused_moe_name(name: str) -> str:
    for theirs, ours in FUSED_MOE_NAMES.items():
        if name.endswith(theirs):
            return name.removesuffix(theirs) + ours
    return name


def _stack_experts(sd: dict[str, torch.Tensor], pre: str, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert HF w1 (gate), w3 (up), w2 (down) of one layer -> w13 [E, 2I, H], w2 [E, H, I]."""
    def expert(e: int, w: str) -> torch.Tensor:
        name = f"{pre}.experts.{e}.{w}.weight"
        if name not in sd:
            raise ValueError(f"weights do not match the model: missing {name} ({num_experts} experts configured)")
        return sd[name]

    w13 = torch.stack([torch.cat([expert(e, "w1"), expert(e, "w3")], dim=0) for e in range(num_experts)])
    return w13, torch.stack([expert(e, "w2") for e in range(num_experts)])

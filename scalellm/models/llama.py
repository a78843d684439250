"""Llama / Mistral / Mixtral decoder in plain PyTorch: RMSNorm, RoPE, GQA attention over a paged KV cache,
and a SwiGLU MLP (dense) or a sparse mixture of SwiGLU experts (Mixtral, ``cfg.num_experts > 0``).

Weights use Hugging Face tensor names; q/k/v and gate/up are fused at load time so each layer runs
three GEMMs instead of five over the step's flat token batch; Mixtral's per-expert w1/w3 and w2 are stacked
into 3-D tensors (see scalellm/models/moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.config import ModelConfig
from scalellm.models.attention import AttentionBatch, attend_in_place, paged_attention
from scalellm.models.moe import SparseMoE

# transformers 5 holds Mixtral's MoE in memory as mlp.gate / mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then
# up) / mlp.experts.down_proj [E, H, I] (its save_pretrained converts back to per-expert w1/w2/w3): same layout
# as ours, other names.
FUSED_MOE_NAMES = {
    ".mlp.gate.weight": ".block_sparse_moe.gate.weight",
    ".mlp.experts.gate_up_proj": ".block_sparse_moe.w13",
    ".mlp.experts.down_proj": ".block_sparse_moe.w2",
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, same result
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin table, indexed by absolute position (HF's rotate-half layout)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, D] of the step's positions: looked up once per step, shared by all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # x: [T, heads, D]
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    kernels = None  # our CPU kernels (scalellm/models/kernels), set by LlamaForCausalLM.use_kernels

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.kernels is not None and batch.kernel is not None:  # rope = (cos, sin tables, positions)
            q = self.kernels.rope_kv(self.qkv_proj(x), *rope, kv_cache, batch.slot_mapping, self.num_heads,
                                     self.num_kv_heads)
            return self.o_proj(attend_in_place(q, kv_cache, batch, self.scale).view(t, self.q_size))
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = apply_rope(qk.unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim)), rope)  # q, k at once
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        o = paged_attention(q, k, v, kv_cache, batch, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    kernels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.down_proj(self.kernels.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.num_experts > 0
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
            )
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    kernels = None

    def forward(self, x, rope, kv_cache, batch) -> torch.Tensor:
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        if self.kernels is not None:  # the residual adds fused into the norms; x is this forward's own tensor
            eps, ops = self.input_layernorm.eps, self.kernels
            h = ops.rms_norm(x, None, self.input_layernorm.weight, eps)
            h = ops.rms_norm(x, self.self_attn(h, rope, kv_cache, batch), self.post_attention_layernorm.weight, eps)
            return x.add_(ffn(h))
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, batch)
        return x + ffn(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    kernels = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] the step's tokens, all sequences flattened
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.kernels is not None and batch.kernel is not None:  # rope_kv reads the tables itself
            rope = (self.rope.cos, self.rope.sin, positions)
        else:
            rope = self.rope.table(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, kv_cache, batch)
        if self.kernels is not None:
            return self.kernels.rms_norm(x, None, self.norm.weight, self.norm.eps)
        return self.norm(x)

    def use_kernels(self, kernels) -> None:
        """Run the layers' elementwise parts on our CPU kernels (``scalellm.models.kernels.load()``)."""
        for module in self.modules():
            if isinstance(module, (LlamaForCausalLM, DecoderLayer, Attention, MLP, SparseMoE)):
                module.kernels = kernels

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

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

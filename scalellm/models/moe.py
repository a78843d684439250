"""Mixtral's sparse mixture of experts over the step's flat token batch.

router logits -> softmax (float32) -> top-k -> renormalise the k weights to sum to 1 -> each token's hidden
state goes through its k SwiGLU experts -> weighted sum.

Batched by expert, not by token: the T*k (token, expert) assignments are sorted by expert once, the tokens
gathered in that order, and each expert that got any tokens runs one SwiGLU over its contiguous slice; one
``index_add_`` scatters the weighted results back.  The Python loop is over experts (E iterations), never
over tokens.  Expert weights are fused 3-D parameters: ``w13[e]`` = cat(gate (HF w1), up (HF w3)) rows,
``w2[e]`` = down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.models.layer_ops import LayerOps, TorchOps
from scalellm.models.linear import Linear
from scalellm.models.step import GENERATED_ROWS, RowSplit


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 ops: LayerOps | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}] (got {top_k})")
        self.ops = ops or TorchOps()  # silu * up as the dense MLP computes it
        self.num_experts, self.top_k, self.intermediate = num_experts, top_k, intermediate
        self.gate = Linear(hidden, num_experts)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.experts13: nn.ModuleList | None = None  # one linear per expert, once split
        self.experts2: nn.ModuleList | None = None

    def split_experts(self, make_linear: Callable[[int, str, torch.Tensor], nn.Module]) -> None:
        """Replace the stacked expert weights by one linear per expert, quantised or on our kernels (the router
        stays as it is).

        ``make_linear(expert, "experts13" | "experts2", weight)`` builds one."""
        self.experts13 = nn.ModuleList(make_linear(e, "experts13", w) for e, w in enumerate(self.w13))
        self.experts2 = nn.ModuleList(make_linear(e, "experts2", w) for e, w in enumerate(self.w2))
        del self.w13, self.w2

    def _expert(self, e: int, x: torch.Tensor, rows: RowSplit) -> torch.Tensor:
        if self.experts13 is None:  # stacked dense experts on torch's matmul
            return F.linear(self.ops.silu_mul(F.linear(x, self.w13[e])), self.w2[e])
        return self.experts2[e](self.ops.silu_mul(self.experts13[e](x, rows)), rows)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, k] float32 weights summing to 1 per token, [T, k] expert ids), as Mixtral routes."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # The last (smallest) weight as 1 minus the others: with k = 2 that subtraction is exact (the first is
        # >= 0.5), so the weights sum to exactly 1 and k identical experts give back the expert's own output.
        last = 1 - weights[:, :-1].sum(dim=-1, keepdim=True)
        return torch.cat([weights[:, :-1], last], dim=-1), experts

    def forward(self, x: torch.Tensor, rows: RowSplit = GENERATED_ROWS) -> torch.Tensor:  # x: [T, H]
        weights, experts = self.route(x)
        flat_experts = experts.flatten()  # assignment a = token a // k, its (a % k)-th choice
        order = flat_experts.argsort(stable=True)
        tokens = order // self.top_k  # token of each assignment, grouped by expert
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()  # one host sync per layer
        xs = x.index_select(0, tokens)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                expert_rows = rows.select(tokens[start : start + n])
                ys[start : start + n] = self._expert(e, xs[start : start + n], expert_rows)
                start += n
        # Weighted sum in float64, rounded to x's dtype once at the end: a float32 share times a float32 weight is
        # exact in float64, so k = 2 identical experts (weights summing to exactly 1) give back the expert's own
        # output bit for bit, in float32 as in bf16. (Rounding each share first, or summing in float32, would not:
        # on the int8-activation kernels such a one-ulp difference grows into different text.)
        ys = ys.double() * weights.flatten()[order].double().unsqueeze(1)
        return x.new_zeros(x.shape, dtype=torch.float64).index_add_(0, tokens, ys).to(x.dtype)

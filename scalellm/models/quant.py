"""Weight-only int8 / int4 linear layers, the swap that installs them, and dense weights on our panel kernels.

* int8: per output channel, symmetric (w = q * s). int4: groups of GROUP_SIZE along the input dimension,
  asymmetric (w = (q - 8) * s + z, q in 0..15). GGUF's Q4_1 blocks are exactly this (32 weights, w = q * d + m,
  so s = d and z = m + 8d), and a GGUF-built engine holds those blocks dequantised: re-deriving s and z from each
  group's min and max gives back the very same q (tests/test_weight_formats.py checks this).

Where our kernels build (scalellm/models/kernels: AVX-512 or AVX2), each row of a step runs on one of two kernels,
chosen by the token alone, never by what it is batched with:

* a generated token's row on q_q8_mm (``PackedLinear.use_q8``): the weights times activations quantised to int8
  per 32-block, llama.cpp's Q4_1 / Q8_0 x Q8 dot product (at one token the step is memory-bound: the weights'
  bytes are what it reads);
* a prompt token's row (``DenseRows``, set by the model runner each step) on the panel kernels (``PanelWeights``):
  the same weights, exactly, times the activations unquantised: q_bf16_mm (bf16 dot products) on CPUs with native
  bf16, q_f32_mm (float32 arithmetic) elsewhere. No dense copy of the weights is kept.

Both compute every row in a fixed order whatever the number of rows, so a request's text does not depend on its
batch by construction, on every CPU (oneDNN's bf16 matmul, which prompt rows once ran on, takes AMX tiles for some
row counts and AVX-512 for others on the same CPU, and their sums round differently). A MoE's experts see the rows
routed to them (``DenseRows.select``); its router, and every layer of the dense formats, run on ``PanelLinear``.

The lm_head (tied to the embedding in SmolLM2, Q8_0 in its GGUF) is int8 in both formats: int4 would add error
where the GGUF itself keeps 8 bits, and at one token it is the largest single matrix (49152 x 576). Its int8 is per
channel; the rows that pick a prompt's first token run on the panels with the embedding's own Q8_0 blocks,
recovered exactly (``q8_0_blocks``); on float32 activations every row does.

Without our kernels, torch's packed matmuls serve (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``,
bf16 activations only) and prompt rows a dense bf16 weight through torch's matmul: correct, slower, and on AMX CPUs
not batch-invariant. The embedding lookup stays dense (a gather reads only the step's rows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.models import kernels

GROUP_SIZE = 32
INT4_INNER_K_TILES = 1  # the CPU packing ignores tiling beyond this; 1 is what its kernel expects
QUANTIZED_FILE = "weights-{quantize}.safetensors"  # an engine directory's packed weights (built once)


@dataclass
class DenseRows:
    """Shared by the packed linears of one model: which rows of this step's flat token batch run dense."""

    all_dense: bool = False
    flags: torch.Tensor | None = None  # bool per row, dense indices and packed indices: in a mixed step only
    dense: torch.Tensor | None = None
    packed: torch.Tensor | None = None

    def update(self, is_dense: list[bool], device: torch.device) -> None:
        """Once a step, from the model runner; tensors only for a step that mixes both kinds of rows."""
        num_dense = sum(is_dense)
        if 0 < num_dense < len(is_dense):
            self.set_flags(torch.tensor(is_dense, dtype=torch.bool, device=device))
        else:
            self._uniform(num_dense == len(is_dense))

    def set_flags(self, flags: torch.Tensor) -> None:
        num_dense = int(flags.sum())
        if 0 < num_dense < len(flags):
            self.all_dense, self.flags = False, flags
            self.dense, self.packed = flags.nonzero().flatten(), (~flags).nonzero().flatten()
        else:
            self._uniform(num_dense == len(flags))

    def _uniform(self, all_dense: bool) -> None:
        self.all_dense, self.flags, self.dense, self.packed = all_dense, None, None, None

    def select(self, rows: torch.Tensor, into: DenseRows) -> None:
        """Make ``into`` describe the given rows of this step (the tokens routed to one MoE expert)."""
        if self.flags is None:
            into._uniform(self.all_dense)
        else:
            into.set_flags(self.flags[rows])


class PackedLinear(nn.Module):
    """A weight-only quantised linear. Where our kernels build, generated rows run on q_q8_mm and prompt rows (the
    rows ``rows`` names) on the panel kernels (``panel_mm``); elsewhere torch's packed kernel and, for prompt rows,
    a dense weight."""

    in_features: int
    out_features: int
    rows: DenseRows | None = None
    dense: torch.Tensor | None = None  # torch's path only: the prompt rows' dense weight (not a buffer, never saved)
    q8: tuple[torch.Tensor | int, ...] | None = None  # q_q8_mm's weights (kernels.pack) and bits
    panels: PanelWeights | None = None  # the panel kernels' weights: prompt rows, or every row without ``q8``

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        """torch's packed kernel."""
        raise NotImplementedError

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [N, K] unsigned, d and m [N, K/32]) with weight = q * d + m: this layer in our kernels' terms."""
        raise NotImplementedError

    def takes_kernels(self) -> bool:
        """Whether our kernels build here and take this layer's shape."""
        shape_fits = not self.in_features % kernels.PAIR and getattr(self, "group_size", GROUP_SIZE) == 32
        return shape_fits and kernels.load() is not None

    def use_q8(self, codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Generated rows on q_q8_mm (activations quantised to int8 per 32-block): these codes, exactly.
        torch's packing is dropped, so ``packed_state`` no longer applies."""
        self.q8 = (*kernels.pack(*codes, self.q8_bits), self.q8_bits)
        self.q8_mm = kernels.load().q_q8_mm
        self.weight = None

    def use_panels(self, weights: PanelWeights) -> None:
        """Prompt rows (every row, without ``q8``) on the panel kernels."""
        self.panels = weights

    def keep_dense(self, weight: torch.Tensor | None, rows: DenseRows) -> None:
        """Run ``rows`` on ``weight`` (torch's path), or on the panels where ``use_panels`` set them (no weight)."""
        self.dense, self.rows = weight, rows

    q8_bits = 8

    def quantized_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.q8 is not None:
            return self.q8_mm(x.contiguous(), *self.q8)
        if self.panels is not None:  # every row on the panels (the lm_head on float32 activations)
            return self.panels.mm(x)
        return self.packed_mm(x)

    def prompt_mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.panels.mm(x) if self.panels is not None else F.linear(x, self.dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        rows = self.rows
        if rows is not None and rows.all_dense:
            out = self.prompt_mm(x2)
        elif rows is None or rows.dense is None:
            out = self.quantized_mm(x2)
        else:  # a step mixing prompt and generated tokens: each row on its own path
            out = x2.new_empty(x2.shape[0], self.out_features)
            out.index_copy_(0, rows.packed, self.quantized_mm(x2.index_select(0, rows.packed)))
            out.index_copy_(0, rows.dense, self.prompt_mm(x2.index_select(0, rows.dense)))
        return out.view(*x.shape[:-1], self.out_features)


class PanelWeights:
    """One weight on our panel kernels (scalellm/models/kernels/panels.h), chosen once for the activations' dtype:
    q_bf16_mm for bfloat16 activations where the CPU has bf16 dot products, else q_f32_mm (bfloat16 activations
    widened to float32, the result rounded back). Each row is computed in a fixed order whatever the number of
    rows: unlike oneDNN's and MKL's GEMMs, a row's result never depends on its batch."""

    def __init__(self, weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype,
                 bits: int | None = None) -> None:
        """``weight``: a dense [N, K] tensor, or codes (q, d, m: w = q * d + m) of ``bits`` 4 or 8."""
        module = kernels.load()
        self.dtype = dtype
        self.widen = dtype != torch.float32 and not kernels.has_bf16_dot()
        if isinstance(weight, tuple):
            self.n, self.bits = weight[0].shape[0], bits
            packed = kernels.pack_panels(*weight, bits)
        else:
            on_bf16 = dtype == torch.bfloat16 and not self.widen
            self.n, self.bits = weight.shape[0], 16 if on_bf16 else 32
            packed = kernels.pack_dense_panels(weight.detach().to(torch.bfloat16 if on_bf16 else torch.float32))
        self.wp, self.d, self.m = packed
        self.kernel = module.q_f32_mm if dtype == torch.float32 or self.widen else module.q_bf16_mm

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.widen:
            return self.kernel(x.float().contiguous(), self.wp, self.d, self.m, self.n, self.bits).to(x.dtype)
        return self.kernel(x.contiguous(), self.wp, self.d, self.m, self.n, self.bits)


class PanelLinear(nn.Module):
    """A dense linear on our panel kernels (``PanelWeights``): where they build, the dense formats' layers and a
    MoE's router, so that these rows too do not depend on their batch."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.panels = PanelWeights(weight, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.panels.mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)


class Int8Linear(PackedLinear):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N], the activations' dtype
        self.out_features, self.in_features = weight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Linear:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        return cls((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per channel: q + 128 in 0..255, d = the channel's scale in every block, m = -128 d."""
        d = self.scales.float()[:, None].expand(-1, self.in_features // 32)
        return self.weight.to(torch.int32) + 128, d, -128 * d


def int4_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """(q int32 [N, K] in 0..15, s [N, K/g], z [N, K/g]) with w ~= (q - 8) * s + z, from each group's min/max."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    s = (high - low) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: q = 0 reproduces it
    q = ((w - low[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, s, low + 8 * s


class Int4Linear(PackedLinear):
    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # torch's CPU int4 packing of q [N, K]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/g, N, 2], the activations' dtype
        self.group_size = group_size
        self.out_features = weight.shape[0]
        self.in_features = scales_and_zeros.shape[0] * group_size

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Linear:
        q, s, z = int4_groups(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
        return cls(packed, torch.stack([s.t(), z.t()], dim=-1).contiguous(), group_size)

    q8_bits = 4

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, K] (0..15) back out of torch's packing, d = s and m = z - 8s: w = (q - 8) s + z."""
        n, k = self.out_features, self.in_features
        nibbles = self.weight.to(torch.int64)
        nibbles = torch.stack([nibbles & 15, nibbles >> 4], -1).flatten()
        q = torch.empty(n * k, dtype=torch.int32)
        q[int4_pack_order(n, k)] = nibbles.to(torch.int32)
        s, z = self.scales_and_zeros.float().unbind(-1)  # [K/32, N]
        return q.view(n, k), s.t(), (z - 8 * s).t()


@functools.cache
def int4_pack_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch's CPU int4 packing of an [N, K] matrix (byte by byte, low nibble first), the flat
    index of the code it holds. Found by packing the indices themselves, one hex digit at a time: the layout is
    torch's own business, and running its kernel on the identity to read codes back took 4 s of start-up on AVX2."""
    index = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    digit = 0
    while (1 << (4 * digit)) < n * k:
        probe = ((index >> (4 * digit)) & 15).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, INT4_INNER_K_TILES).to(torch.int64)
        order |= torch.stack([packed & 15, packed >> 4], -1).flatten() << (4 * digit)
        digit += 1
    return order


LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def q8_0_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The weight as GGUF Q8_0 blocks in q_f32_mm's terms (q + 128, d, m = -128 d; d = the block's max |w| / 127
    in float16), or None unless q * d gives back every float32 weight exactly."""
    n, k = weight.shape
    if k % 32:
        return None
    w = weight.detach().float().view(n, k // 32, 32)
    d = (w.abs().amax(-1) / 127).half().float()
    q = (w / torch.where(d > 0, d, 1)[..., None]).round().clamp(-127, 127)
    if not torch.equal(q * d[..., None], w):
        return None
    return (q.to(torch.int32) + 128).view(n, k), d, -128 * d


def quantize_model(model: nn.Module, quantize: str, dtype: torch.dtype,
                   stored: dict[str, torch.Tensor] | None = None, dense: DenseRows | None = None,
                   int8_activations: bool = False, head_dense: DenseRows | None = None) -> None:
    """Swap the decoder's dense linear layers (and its experts) for packed ones, in place.

    ``stored``: the packed buffers of an earlier call (``packed_state``), loaded instead of re-quantising.
    Scales end up in ``dtype``, the activations' dtype. ``dense``: the rows that run as prompt rows (on the panel
    kernels, or on torch's path on each layer's dense weight, which must then already be in ``dtype``); None = every
    row on the packed kernels. ``head_dense``: the same for the lm_head's rows (a prompt's last row, whose logits
    pick the first generated token). ``int8_activations``: our kernels where they build (q_q8_mm and the panels).
    """
    from scalellm.models.moe import SparseMoE

    if quantize == "none":
        return

    def make(path: str, weight: torch.Tensor, kind: str, rows: DenseRows | None, head: bool = False) -> nn.Module:
        cls = LINEARS[kind]
        if stored is not None:
            buffers = {name.removeprefix(f"{path}."): t for name, t in stored.items() if name.startswith(f"{path}.")}
            linear = cls(*(buffers[name] for name in ("weight", "scales_and_zeros" if kind == "int4" else "scales")))
        else:
            linear = cls.quantize(weight)
        on_kernels = int8_activations and linear.takes_kernels()
        codes = linear.codes() if on_kernels else None  # from float32 scales: the weights exactly
        for name, buffer in linear.named_buffers():
            if buffer.is_floating_point():
                setattr(linear, name, buffer.to(dtype))
        if not on_kernels:
            if rows is not None:
                linear.keep_dense(weight.detach(), rows)
            return linear
        linear.use_q8(codes)
        if not head:
            if rows is not None:
                linear.use_panels(PanelWeights(codes, dtype, linear.q8_bits))
                linear.keep_dense(None, rows)
            return linear
        # The lm_head's int8 is per channel, lossy against the tied embedding: the rows it runs on the panels take
        # the embedding's own Q8_0 blocks where it holds them exactly (a GGUF-built engine does), else the
        # embedding itself. With exact blocks on float32 activations, every row: float32's own logits, and at 64
        # rows faster than q_q8_mm on AVX2 (its 8-bit dot product takes twice the 4-bit one's instructions).
        blocks = q8_0_blocks(weight)
        if blocks is not None and dtype == torch.float32:
            linear.q8 = None
            linear.use_panels(PanelWeights(blocks, dtype, 8))
        elif rows is not None:
            linear.use_panels(PanelWeights(blocks if blocks is not None else weight, dtype, 8))
        if rows is not None:
            linear.keep_dense(None, rows)
        return linear

    for path, module in list(model.named_modules()):
        if isinstance(module, SparseMoE):
            if dense is not None:
                module.rows, module.expert_rows = dense, DenseRows()
            module.quantize(lambda e, name, w, p=path, m=module: make(f"{p}.{name}.{e}", w, quantize, m.expert_rows))
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{path}.{name}" if path else name
                head = name == "lm_head"
                rows = head_dense if head else dense
                setattr(module, name, make(full, child.weight, "int8" if head else quantize, rows, head))


def dense_on_panels(model: nn.Module) -> None:
    """Every ``nn.Linear`` left in the model (each layer of a dense format, a MoE's router) on ``PanelLinear``,
    in place. Only where our kernels build."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and not child.in_features % 32:
                setattr(module, name, PanelLinear(child.weight))


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed linears' buffers of a quantised model (what ``quantize_model(stored=...)`` takes back)."""
    return {name: t.contiguous() for path, m in model.named_modules() if isinstance(m, tuple(LINEARS.values()))
            for name, t in ((f"{path}.{n}", b) for n, b in m.named_buffers())}

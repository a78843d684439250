"""Weight-only int8 / int4 linear layers on torch's packed CPU matmuls, and the swap that installs them.

* int8: per output channel, symmetric (w = q * s), ``aten._weight_int8pack_mm``.
* int4: groups of GROUP_SIZE along the input dimension, asymmetric (w = (q - 8) * s + z, q in 0..15),
  ``aten._weight_int4pack_mm_for_cpu``. GGUF's Q4_1 blocks are exactly this (32 weights, w = q * d + m,
  so s = d and z = m + 8d), and a GGUF-built engine holds those blocks dequantised: re-deriving s and z
  from each group's min and max gives back the very same q, so int4 loses nothing against the float32
  reference beyond bf16 rounding of s and z (tests/test_weight_formats.py checks this).

Packed kernels win while a step is memory-bound (a few tokens); bf16 GEMMs beat them from ~16 tokens on a Zen 5
EPYC (2.8x at 512; docs/benchmarks.md). So each packed layer may also keep its dense weight (the float32
reference cast to bf16) and run the step's **prompt tokens** on it (DenseRows, set by the model runner per step),
generated tokens on the packed kernel. Which path a token takes depends only on whether it belongs to its prompt,
never on what it is batched with, and both kernels compute each row the same whatever the other rows are (tested),
so a request's text does not depend on its batch. A MoE's experts see the rows routed to them
(``DenseRows.select``). The dense copy costs memory: turn it off for a model too large for both
(``EngineConfig.dense_prompts``).

Where our kernels build (AVX-512 VNNI or AVX2) the packed layers run instead on q_q8_mm (``PackedLinear.use_q8``,
scalellm/models/kernels/q_q8.cpp): the same weights times activations quantised to int8 per 32-block, llama.cpp's
Q4_1 / Q8_0 x Q8 dot product, 1.4-2x torch's packed kernels on VNNI (``EngineConfig.int8_activations``). It takes
float32 activations too, which is what makes the quantised formats pay on AVX2 CPUs (scalellm/models/formats.py).
There the prompt rows run on q_f32_mm instead of a dense copy (``PackedLinear.use_f32``): the same weights, which
are exactly the float32 reference's, in float32 arithmetic, 1.1-1.8x MKL's sgemm at 128 prompt rows on a Zen 3
EPYC and batch-invariant by construction; no dense float32 copy is kept.

The lm_head (tied to the embedding in SmolLM2, Q8_0 in its GGUF) is int8 in both formats: int4 would add
error where the GGUF itself keeps 8 bits, and at one token it is the largest single matrix (49152 x 576). Its
int8 is per channel; with bf16 activations the rows that pick a prompt's first token use the embedding itself
(dense). On float32 activations every row runs on q_f32_mm with the embedding's own Q8_0 blocks, recovered
exactly (``q8_0_blocks``): float32's logits, at one row as fast as q_q8_mm (memory-bound: 2.5 against 2.3 ms a
step on the Zen 3 EPYC) and at 64 rows faster (28 against 42 ms: q_q8's 8-bit AVX2 dot product takes twice the
4-bit one's instructions).
The embedding lookup stays dense (a gather reads only the step's rows). MoE routers stay dense (tiny).
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
MIN_DENSE_ROWS = 16  # float32 dense calls: see PackedLinear.dense_mm
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
    """A weight-only quantised linear; optionally its dense weight too, for the rows ``rows`` names."""

    in_features: int
    out_features: int
    dense: torch.Tensor | None = None  # not a buffer: never saved with the packed weights
    rows: DenseRows | None = None

    def keep_dense(self, weight: torch.Tensor | None, rows: DenseRows) -> None:
        """Run ``rows`` on ``weight`` (or on q_f32_mm, where ``use_q8(f32_rows=True)`` packed it: no weight)."""
        self.dense, self.rows = weight, rows

    # q_q8_mm's weights (kernels.pack) and bits, once ``use_q8`` packed them; None = torch's kernel.
    q8: tuple[torch.Tensor, ...] | None = None
    q8_bits = 8
    # q_f32_mm's (kernels.pack_f32), for the rows ``rows`` names on float32 activations; None = ``dense``.
    f32: tuple[torch.Tensor | int, ...] | None = None

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        """torch's packed kernel."""
        raise NotImplementedError

    def quantized_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.q8 is not None:
            return self.q8_mm(x.contiguous(), *self.q8)
        if self.f32 is not None:  # every row on q_f32_mm (the lm_head on float32 activations)
            return self.f32_mm(x.contiguous(), *self.f32)
        return self.packed_mm(x)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [N, K] unsigned, d and m [N, K/32]) with weight = q * d + m: this layer in q_q8_mm's terms."""
        raise NotImplementedError

    def use_q8(self, f32_rows: bool = False) -> bool:
        """Run on our q_q8_mm (activations quantised to int8 per 32-block) where it builds and takes this layer;
        with ``f32_rows``, also the rows ``rows`` names on q_f32_mm (float32 arithmetic on the same weights).

        The weights stay exactly what they are; torch's packing is dropped, so ``packed_state`` no longer applies.
        """
        module = kernels.load()
        if module is None or self.in_features % kernels.PAIR or getattr(self, "group_size", 32) != 32:
            return False
        codes = self.codes()
        self.q8 = (*kernels.pack(*codes, self.q8_bits), self.q8_bits)
        self.q8_mm = module.q_q8_mm
        if f32_rows:
            self.use_f32(codes, self.q8_bits)
        self.weight = None
        return True

    def use_f32(self, codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int) -> None:
        """Float32 rows on q_f32_mm with these codes (q, d, m: w = q * d + m, exactly), not on a dense weight."""
        self.f32 = (*kernels.pack_f32(*codes, bits), self.out_features, bits)
        self.f32_mm = kernels.load().q_f32_mm

    def dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """The rows that run dense: on q_f32_mm where it was packed, else on the dense weight. MKL's float32 GEMM
        computes a row differently below 12 rows (1-3, 5-7, 9-11 on a Zen 3 EPYC) than from there on, so float32
        calls get at least MIN_DENSE_ROWS rows (zero padding): a prompt row's result then does not depend on how
        many rows share its step."""
        if self.f32 is not None and x.dtype == torch.float32:
            return self.f32_mm(x.contiguous(), *self.f32)
        if x.dtype != torch.float32 or x.shape[0] >= MIN_DENSE_ROWS:
            return F.linear(x, self.dense)
        return F.linear(F.pad(x, (0, 0, 0, MIN_DENSE_ROWS - x.shape[0])), self.dense)[: x.shape[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        rows = self.rows
        if rows is not None and rows.all_dense:
            out = self.dense_mm(x2)
        elif rows is None or rows.dense is None:
            out = self.quantized_mm(x2)
        else:  # a step mixing prompt and generated tokens: each row on its own path
            out = x2.new_empty(x2.shape[0], self.out_features)
            out.index_copy_(0, rows.packed, self.quantized_mm(x2.index_select(0, rows.packed)))
            out.index_copy_(0, rows.dense, self.dense_mm(x2.index_select(0, rows.dense)))
        return out.view(*x.shape[:-1], self.out_features)


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
    Scales end up in ``dtype``, the activations' dtype the kernels require. ``dense``: keep each dense weight
    (it must already be in ``dtype``) for the rows ``dense`` names; None = packed kernels only. The lm_head keeps
    none of its own: ``head_dense`` names the sampling rows that run on its dense weight (tied to the embedding, so
    no copy): a prompt's last row, whose logits pick the first generated token. ``int8_activations``: the packed
    layers on our q_q8_mm where it builds (``PackedLinear.use_q8``).
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
        for name, buffer in linear.named_buffers():
            if buffer.is_floating_point():
                setattr(linear, name, buffer.to(dtype))
        f32_rows = rows is not None and dtype == torch.float32
        if int8_activations and linear.use_q8(f32_rows and not head) and f32_rows and head:
            # the lm_head's int8 is per channel, lossy against the tied embedding: on float32 activations all
            # its rows run on the embedding's own Q8_0 blocks where it holds them exactly (a GGUF-built engine does)
            codes = q8_0_blocks(weight)
            if codes is not None:
                linear.use_f32(codes, 8)
                linear.q8 = None
        if rows is not None:
            linear.keep_dense(None if linear.f32 is not None else weight.detach(), rows)
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


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed linears' buffers of a quantised model (what ``quantize_model(stored=...)`` takes back)."""
    return {name: t.contiguous() for path, m in model.named_modules() if isinstance(m, tuple(LINEARS.values()))
            for name, t in ((f"{path}.{n}", b) for n, b in m.named_buffers())}

"""The model's linear layers, one class per weight format, and the swap that installs the quantised ones.

* ``Linear``: dense weights (the float32 and bfloat16 formats; a MoE's router in every format).
* ``Int8Linear``: int8 per output channel, symmetric (w = q * s).
* ``Int4Linear``: int4 in groups of GROUP_SIZE along the input dimension, asymmetric (w = (q - 8) * s + z,
  q in 0..15). GGUF's Q4_1 blocks are exactly this (32 weights, w = q * d + m, so s = d and z = m + 8d), and a
  GGUF-built engine holds those blocks dequantised: re-deriving s and z from each group's min and max gives back
  the very same q (tests/test_weight_formats.py checks this).

Each layer's matmuls are chosen once, at load (``finalize``, ``quantize_model``), from our kernels where they build
(scalellm/models/kernels) or torch's otherwise; its forward then has one path. The quantised layers have two
matmuls, and a row takes one by its token (``RowSplit``), never by what it is batched with:

* a generated token's row: ``Q8`` (q_q8_mm): the weights times activations quantised to int8 per 32-block,
  llama.cpp's Q4_1 / Q8_0 x Q8 dot product (at one token the step is memory-bound: the weights' bytes are what it
  reads; on AMX, batches of 16 rows and more on int8 tiles, the same bits); without our kernels torch's packed
  int8 / int4 matmuls (bf16 activations only);
* a prompt token's row: ``Panels`` (q_bf16_mm where the CPU has bf16 dot products, on AMX's bf16 tiles where it
  has them; q_f32_mm in float32 elsewhere): the same weights, exactly, times the activations unquantised, so the
  prompt's first token is picked without int8 activation noise (it moved "The capital of France is Paris" to
  another answer); no dense copy of the weights is kept. Without our kernels, a dense copy through torch's matmul.

The one class and the one function a generated token's row passes through, per format (our kernels / torch's):

| format (scalellm_engine.json) | class | matmul (our kernels) | without them |
| --- | --- | --- | --- |
| float32, bfloat16 | ``Linear`` | ``Panels``: q_f32_mm / q_bf16_mm | ``TorchDense``: F.linear |
| int8 (lm_head of every quantised format) | ``Int8Linear`` | ``Q8``: q_q8_mm (8 bits) | ``aten._weight_int8pack_mm`` |
| int4 | ``Int4Linear`` | ``Q8``: q_q8_mm (4 bits) | ``aten._weight_int4pack_mm_for_cpu`` |

Our kernels compute every row in one fixed order whatever the number of rows, so with them a request's text does
not depend on its batch by construction, on every CPU; torch's GEMMs do not promise that (oneDNN's bf16 matmul
takes AMX tiles for some row counts and AVX-512 for others on the same Xeon). Dense layers run on ``Panels`` too.

The lm_head (tied to the embedding in SmolLM2, Q8_0 in its GGUF) is int8 in the quantised formats: int4 would
add error where the GGUF itself keeps 8 bits, and at one token it is the largest single matrix (49152 x 576). Its
int8 is per channel; its prompt rows (a prompt's last row, whose logits pick the first generated token) take the
embedding's own Q8_0 blocks where it holds them exactly (``q8_0_blocks``); on float32 activations every row does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.models import kernels
from scalellm.models.step import GENERATED_ROWS, RowSplit

GROUP_SIZE = 32
INT4_INNER_K_TILES = 1  # the CPU packing ignores tiling beyond this; 1 is what its kernel expects
QUANTIZED_FILE = "weights-{quantize}.safetensors"  # an engine directory's packed weights (built once)

Matmul = Callable[[torch.Tensor], torch.Tensor]  # x [M, K] (contiguous) -> [M, N]
Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (q [N, K] unsigned, d, m [N, K/32]): w = q * d + m


# ---- matmuls --------------------------------------------------------------------------------------------------

class Q8:
    """q_q8_mm: the weights (codes, exactly) times activations quantised to int8 per 32-block."""

    def __init__(self, codes: Codes, bits: int) -> None:
        self.wq, self.d, self.m = kernels.pack(*codes, bits)
        self.n, self.bits = codes[0].shape[0], bits
        self.kernel = kernels.load().q_q8_mm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.wq, self.d, self.m, self.n, self.bits)


class Panels:
    """The panel kernels (scalellm/models/kernels/panels.h), chosen once for the activations' dtype: q_bf16_mm for
    bfloat16 activations where the CPU has bf16 dot products, else q_f32_mm (bfloat16 activations widened to
    float32, the result rounded back). ``weight``: a dense [N, K] tensor, or codes of ``bits`` 4 or 8."""

    def __init__(self, weight: torch.Tensor | Codes, dtype: torch.dtype, bits: int = 8) -> None:
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
        module = kernels.load()
        self.kernel = module.q_f32_mm if dtype == torch.float32 or self.widen else module.q_bf16_mm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.widen:
            return self.kernel(x.float(), self.wp, self.d, self.m, self.n, self.bits).to(x.dtype)
        return self.kernel(x, self.wp, self.d, self.m, self.n, self.bits)


class TorchDense:
    """torch's matmul on a dense weight (without our kernels)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# ---- layers ---------------------------------------------------------------------------------------------------

class Linear(nn.Module):
    """A dense linear (no bias), named as Hugging Face names its weight. ``finalize`` picks its matmul once the
    weight is loaded; before that (building an engine, loading weights) torch's."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.matmul: Matmul | None = None

    @classmethod
    def of(cls, weight: torch.Tensor, on_kernels: bool) -> Linear:
        """A finalized linear holding ``weight`` [N, K]."""
        linear = cls(weight.shape[1], weight.shape[0])
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        linear.finalize(on_kernels)
        return linear

    def finalize(self, on_kernels: bool) -> None:
        if on_kernels and not self.in_features % 32:
            self.matmul = Panels(self.weight, self.weight.dtype)
            del self.weight  # held in the panels now
        else:
            self.matmul = TorchDense(self.weight)

    def forward(self, x: torch.Tensor, rows: RowSplit = GENERATED_ROWS) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        out = self.matmul(x2) if self.matmul is not None else F.linear(x2, self.weight)
        return out.view(*x.shape[:-1], self.out_features)


class QuantizedLinear(nn.Module):
    """Weight-only quantised weights (``Int8Linear``, ``Int4Linear``): generated rows on ``generated``, prompt rows
    on ``prompt`` (None: every row on ``generated``). Both are set by ``quantize_model``."""

    in_features: int
    out_features: int
    bits: int
    generated: Matmul
    prompt: Matmul | None = None

    def codes(self) -> Codes:
        """This layer's stored weights as (q, d, m), w = q * d + m: what our kernels take."""
        raise NotImplementedError

    @classmethod
    def codes_of(cls, weight: torch.Tensor) -> Codes:
        """What ``cls.quantize(weight).codes()`` gives, without torch's packing (our kernels need none)."""
        raise NotImplementedError

    @classmethod
    def shaped(cls, out_features: int, in_features: int) -> QuantizedLinear:
        """A layer of this shape holding no stored weights (its matmuls hold them: our kernels)."""
        linear = cls.__new__(cls)
        nn.Module.__init__(linear)
        linear.out_features, linear.in_features = out_features, in_features
        return linear

    def torch_matmul(self) -> Matmul:
        """torch's packed matmul on the stored weights (bf16 activations)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, rows: RowSplit = GENERATED_ROWS) -> torch.Tensor:
        if self.prompt is None or not (rows.all_prompt or rows.mixed):
            if x.dim() == 2 and x.is_contiguous():  # the engine's flat token batch: no reshaping (a decode step
                return self.generated(x)  # calls this 121 times)
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.prompt is None or not (rows.all_prompt or rows.mixed):
            out = self.generated(x2)
        elif rows.all_prompt:
            out = self.prompt(x2)
        elif rows.first_prompt is not None:  # generated rows, then prompt rows: each kind on its own path
            out = torch.cat([self.generated(x2[: rows.first_prompt]), self.prompt(x2[rows.first_prompt :])])
        else:  # prompt and generated rows interleaved
            out = x2.new_empty(x2.shape[0], self.out_features)
            out.index_copy_(0, rows.generated, self.generated(x2.index_select(0, rows.generated)))
            out.index_copy_(0, rows.prompt, self.prompt(x2.index_select(0, rows.prompt)))
        return out.view(*x.shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    bits = 8

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N]
        self.out_features, self.in_features = weight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Linear:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        return cls((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales)

    def torch_matmul(self) -> Matmul:
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def codes(self) -> Codes:
        """Per channel: q + 128 in 0..255, d = the channel's scale in every block, m = -128 d."""
        d = self.scales.float()[:, None].expand(-1, self.in_features // 32)
        return self.weight.to(torch.int32) + 128, d, -128 * d

    @classmethod
    def codes_of(cls, weight: torch.Tensor) -> Codes:
        return cls.quantize(weight).codes()


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


class Int4Linear(QuantizedLinear):
    bits = 4

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # torch's CPU int4 packing of q [N, K]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/g, N, 2]
        self.group_size = group_size
        self.out_features = weight.shape[0]
        self.in_features = scales_and_zeros.shape[0] * group_size

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Linear:
        q, s, z = int4_groups(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
        return cls(packed, torch.stack([s.t(), z.t()], dim=-1).contiguous(), group_size)

    def torch_matmul(self) -> Matmul:
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                                    self.scales_and_zeros)

    def codes(self) -> Codes:
        """q [N, K] (0..15) back out of torch's packing, d = s and m = z - 8s: w = (q - 8) s + z."""
        n, k = self.out_features, self.in_features
        nibbles = self.weight.to(torch.int64)
        nibbles = torch.stack([nibbles & 15, nibbles >> 4], -1).flatten()
        q = torch.empty(n * k, dtype=torch.int32)
        q[int4_pack_order(n, k)] = nibbles.to(torch.int32)
        s, z = self.scales_and_zeros.float().unbind(-1)  # [K/32, N]
        return q.view(n, k), s.t(), (z - 8 * s).t()

    @classmethod
    def codes_of(cls, weight: torch.Tensor) -> Codes:
        q, s, z = int4_groups(weight)
        return q, s, z - 8 * s


@functools.cache
def int4_pack_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch's CPU int4 packing of an [N, K] matrix (byte by byte, low nibble first), the flat
    index of the code it holds. Found by packing the indices themselves, one hex digit at a time: the layout is
    torch's own business (it differs between CPU capabilities), and running its kernel on the identity to read
    codes back took 4 s of start-up on AVX2."""
    index = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    digit = 0
    while (1 << (4 * digit)) < n * k:
        probe = ((index >> (4 * digit)) & 15).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, INT4_INNER_K_TILES).to(torch.int64)
        order |= torch.stack([packed & 15, packed >> 4], -1).flatten() << (4 * digit)
        digit += 1
    return order


LINEARS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def q8_0_blocks(weight: torch.Tensor) -> Codes | None:
    """The weight as GGUF Q8_0 blocks (q + 128, d, m = -128 d; d = the block's max |w| / 127 in float16), or None
    unless q * d gives back every float32 weight exactly."""
    n, k = weight.shape
    if k % 32:
        return None
    w = weight.detach().float().view(n, k // 32, 32)
    d = (w.abs().amax(-1) / 127).half().float()
    q = (w / torch.where(d > 0, d, 1)[..., None]).round().clamp(-127, 127)
    if not torch.equal(q * d[..., None], w):
        return None
    return (q.to(torch.int32) + 128).view(n, k), d, -128 * d


def takes_kernels(linear: QuantizedLinear) -> bool:
    """Whether our kernels build here and take this layer's shape."""
    shape_fits = not linear.in_features % kernels.BLOCK and getattr(linear, "group_size", GROUP_SIZE) == 32
    return shape_fits and kernels.load() is not None


def install_matmuls(linear: QuantizedLinear, weight: torch.Tensor, dtype: torch.dtype, on_kernels: bool,
                    prompts: bool, head: bool = False, codes: Codes | None = None) -> None:
    """Choose ``linear``'s matmuls (see the module docstring), once. ``weight``: the dense weight it was quantised
    from (in ``dtype``): the prompt rows' without our kernels, the lm_head's Q8_0 blocks with them. ``codes``: its
    weights for our kernels when it holds no stored ones (else read back from them)."""
    if not (on_kernels and takes_kernels(linear)):
        for name, buffer in linear.named_buffers():
            if buffer.is_floating_point():
                setattr(linear, name, buffer.to(dtype))  # torch's packed matmuls take scales in the activations'
        linear.generated = linear.torch_matmul()
        linear.prompt = TorchDense(weight) if prompts else None
        return
    codes = codes if codes is not None else linear.codes()  # from the float32 scales: the weights exactly
    linear.generated = Q8(codes, linear.bits)
    linear.prompt = Panels(codes, dtype, linear.bits) if prompts else None
    if head:
        blocks = q8_0_blocks(weight)
        if blocks is not None and dtype == torch.float32:  # every row: float32's own logits, and at 64 rows
            linear.generated = linear.prompt = Panels(blocks, dtype)  # faster than q_q8_mm on AVX2
        elif prompts:
            linear.prompt = Panels(blocks if blocks is not None else weight, dtype)
    for name in [name for name, _ in linear.named_buffers()]:
        delattr(linear, name)  # torch's packing: not used on our kernels


def quantize_model(model: nn.Module, quantize: str, dtype: torch.dtype, stored: dict[str, torch.Tensor] | None = None,
                   on_kernels: bool = False, prompts: bool = True) -> None:
    """Swap the decoder's dense ``Linear`` layers (and a MoE's experts, not its router) for quantised ones, in place,
    each with its matmuls chosen.

    ``stored``: the packed weights of an earlier call (``packed_state``), loaded instead of re-quantising.
    ``dtype``: the activations'. ``on_kernels``: our kernels where they build (else torch's). ``prompts``: prompt
    rows on unquantised activations (else every row as a generated one).
    """
    if quantize == "none":
        return

    def make(path: str, weight: torch.Tensor, kind: str, head: bool = False) -> QuantizedLinear:
        cls = LINEARS[kind]
        codes = None
        if stored is not None:
            buffers = {name.removeprefix(f"{path}."): t for name, t in stored.items() if name.startswith(f"{path}.")}
            linear = cls(*(buffers[name] for name in ("weight", "scales_and_zeros" if kind == "int4" else "scales")))
        elif on_kernels and kernels.load() is not None and not weight.shape[1] % kernels.BLOCK:
            linear = cls.shaped(*weight.shape)  # codes straight from the weights: torch's packing is not needed
            codes = cls.codes_of(weight.detach().float())
        else:
            linear = cls.quantize(weight)
        install_matmuls(linear, weight.detach().to(dtype), dtype, on_kernels, prompts, head, codes)
        return linear

    for path, module in list(model.named_modules()):
        if hasattr(module, "split_experts"):  # a MoE: its experts (its router stays dense)
            module.split_experts(lambda e, name, w, p=path: make(f"{p}.{name}.{e}", w, quantize))
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                full = f"{path}.{name}" if path else name
                head = name == "lm_head"
                setattr(module, name, make(full, child.weight, "int8" if head else quantize, head))


def finalize(model: nn.Module, on_kernels: bool) -> None:
    """Every dense ``Linear`` left (the dense formats' layers, a MoE's router) on its matmul, once its weight is
    loaded: the panels on our kernels, else torch's; on our kernels a dense format's MoE experts too."""
    on_kernels = on_kernels and kernels.load() is not None
    for module in list(model.modules()):
        if isinstance(module, Linear):
            module.finalize(on_kernels)
        elif on_kernels and getattr(module, "experts13", 0) is None:  # a MoE's stacked dense experts
            module.split_experts(lambda e, name, w: Linear.of(w, on_kernels=True))


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantised layers' stored weights (what ``quantize_model(stored=...)`` takes back): only where they were
    quantised for torch's matmuls (``on_kernels`` False), which keeps them."""
    return {name: t.contiguous() for path, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for name, t in ((f"{path}.{n}", b) for n, b in m.named_buffers())}

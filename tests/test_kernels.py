"""Our CPU kernels (scalellm/models/kernels) against plain torch computing the same thing.

Each test runs once per instruction set this CPU runs (AVX-512 VNNI and AVX2 on an AVX-512 machine, AVX2 alone
on an AVX2 one); without AVX2 the engine keeps torch's kernels and these skip. The tests marked ``isa_path`` run
again under every lower instruction-set level the CPU has (tests/test_isa_paths.py).
What a user would notice if they broke: wrong logits, or a request's text changing with what it is batched with.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
import threading
from pathlib import Path

import pytest
import torch

from scalellm.models import cpu, kernels
from scalellm.models.attention import decode_attention, decode_bias
from scalellm.models.linear import Int4Linear, Int8Linear, install_matmuls, int4_groups

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no AVX2 or no compiler here")


@pytest.fixture(params=kernels.runnable_isas() or ["none"])
def ops(request):
    """The kernels built for one instruction set."""
    module = kernels.load(request.param)
    if module is None:  # the compiler built the best set (the module is not skipped), so this one must build too
        pytest.fail(f"our {request.param} kernels did not build on a CPU that runs them (see the log's error)")
    return module


def is_avx2_build(ops) -> bool:
    """Whether ``ops`` is the AVX2 build: no bf16 dot products, no tiles (on an AMX CPU the second build is AVX-512)."""
    return ops.tile_unit() == "none"


def reference_q_q8(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """What q_q8_mm computes, in float64: x quantised to int8 per 32-block times the weights q * d + m."""
    rows, k = x.shape
    blocks = x.double().view(rows, k // 32, 32)
    ds = blocks.abs().amax(-1, keepdim=True) / 127
    a = torch.where(ds > 0, (blocks / ds.clamp(min=1e-30)).round(), 0) * ds
    w = q.double() * d.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)
    return a.view(rows, k) @ w.t()


@pytest.mark.parametrize("rows", [7, 70])  # even column split below 16 rows, dynamic grabs from 16 on
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_q8_mm_matches_its_definition(ops, bits, dtype, rows):
    torch.manual_seed(0)
    n, k = 37, 1088  # a column tail (37 = 2 * 16 + 5); two groups of 16 blocks, then a pair
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.int32)
    # scales as the kernel keeps them (float16), so that the reference multiplies the very same weights
    d, m = (torch.rand(n, k // 32) * 0.01).half().float(), (torch.randn(n, k // 32) * 0.01).half().float()
    x = torch.randn(rows, k).to(dtype)  # a row tail (7 = 4 + 3; 70 = 64 + 4 + 2)
    out = ops.q_q8_mm(x, *kernels.pack(q, d, m, bits), n, bits)
    want = reference_q_q8(x.float(), q, d, m)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.double(), want, rtol=tol, atol=tol * want.abs().max().item())


ROW_COUNTS = (1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 23, 64)  # direct and panel paths, full and tail tiles, many grabs


def coded_weights(bits: int, n: int = 37, k: int = 1088, seed: int = 4) -> tuple[torch.Tensor, ...]:
    """(q, d, m) of ``bits`` and the weight q * d + m in float64; 37 = 2 * 16 + 5 columns: a panel tail."""
    torch.manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.int32)
    d, m = torch.rand(n, k // 32) * 0.01, torch.randn(n, k // 32) * 0.01
    return q, d, m, q.double() * d.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)


def assert_rows_alone(mm, x: torch.Tensor, out: torch.Tensor) -> None:
    """Each leading run of rows, and a run from the middle, gives the very bits it gave among all the rows."""
    for rows in ROW_COUNTS:
        assert torch.equal(mm(x[:rows].contiguous()), out[:rows]), f"{rows} rows"
    assert torch.equal(mm(x[17:40].contiguous()), out[17:40])


@pytest.mark.isa_path
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_q8_mm_rows_on_int8_tiles_are_the_bits_of_each_row_alone(ops, bits, dtype):
    """From 16 rows on, an AMX CPU computes rows in groups of 16 on int8 tiles (TDPBSUD): the same exact block sums
    as the dot products, the same float steps, so a batch of 64 gives each row the bits it has alone (one row is
    always on dot products). Where the CPU has no AMX, the tiles are their software model (tiles.h), which runs
    the kernel's layout, tile shapes and float steps; the hardware unit itself is then not run."""
    unit = ops.tile_unit()
    if unit == "none":
        pytest.skip("not run: the tile kernel is in the AVX-512 builds (this is the AVX2 one)")
    q, d, m, _ = coded_weights(bits)
    n, k = q.shape
    packed = kernels.pack(q, d, m, bits)
    x = torch.randn(70, k).to(dtype)
    alone = torch.cat([ops.q_q8_mm(x[i : i + 1].contiguous(), *packed, n, bits) for i in range(70)])
    for rows in (16, 17, 33, 70):  # one group; a group and a row on dot products; groups and a tail
        assert torch.equal(ops.q_q8_mm_tiles(x[:rows].contiguous(), *packed, n, bits), alone[:rows]), f"{rows} rows"
    assert ops.tile_checks() == (True, True)  # what the hardware must pass before q_q8_mm and q_bf16_mm take it
    if unit == "amx":  # and q_q8_mm itself takes the tiles there
        assert torch.equal(ops.q_q8_mm(x, *packed, n, bits), alone)
    want = reference_q_q8(x.float(), q, d.half().float(), m.half().float())  # the scales as pack keeps them
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(alone.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_amx_cpus_run_the_tile_kernel_on_amx():
    """On a CPU with AMX, the engine's kernels are the amx build and Linux grants this process the tile state."""
    if cpu.missing_flags("amx"):
        pytest.skip(f"not run: this CPU lacks {', '.join(cpu.missing_flags('amx'))}: no AMX tiles to run here")
    assert kernels.best_isa() == "amx"
    assert kernels.load().tile_unit() == "amx"


def test_the_amx_kernels_compile_to_tile_instructions(tmp_path):
    """The AMX paths compile on any machine with the compiler: each tile kernel's source with the amx set's flags,
    in which the tile unit is AMX's instructions (LDTILECFG, TILELOADD, the product, TILESTORED), not the model."""
    from torch.utils import cpp_extension

    products = {"q_q8.cpp": "tdpbsud", "q_bf16.cpp": "tdpbf16ps"}
    includes = [f"-I{path}" for path in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    builds = {source: subprocess.Popen(["c++", "-std=c++20", "-fPIC", *kernels.CFLAGS, *kernels.ISAS["amx"], *includes,
                                        "-c", str(Path(kernels.__file__).with_name(source)),
                                        "-o", str(tmp_path / f"{source}.o")],
                                       stderr=subprocess.PIPE, text=True)
              for source in products}  # both at once: most of the time is parsing torch's headers
    stderr = {source: build.communicate()[1] for source, build in builds.items()}
    errors = {source: stderr[source] for source, build in builds.items() if build.returncode != 0}
    if any("unrecognized command-line option" in error for error in errors.values()):
        pytest.skip(f"not run: this compiler has no AMX flags: {next(iter(errors.values())).strip()[:300]}")
    assert not errors, errors
    for source, product in products.items():
        listing = subprocess.run(["objdump", "-d", str(tmp_path / f"{source}.o")], capture_output=True, text=True,
                                 check=True).stdout
        for instruction in ("ldtilecfg", "tileloadd", product, "tilestored", "tilerelease"):
            assert instruction in listing, f"{source}: {instruction}"


@pytest.mark.isa_path
@pytest.mark.parametrize("bits", [4, 8, 32])
def test_q_f32_mm_is_float32_arithmetic_on_the_weights_and_batch_invariant(ops, bits):
    """Prompt rows on float32 activations (coded weights) and dense float32 weights (bits 32): the weights times x
    to float32 rounding, each row the same bits whatever the rows around it."""
    q, d, m, w = coded_weights(4 if bits == 32 else bits)
    packed = kernels.pack_dense_panels(w.float()) if bits == 32 else kernels.pack_panels(q, d, m, bits)
    x = torch.randn(70, q.shape[1])
    out = ops.q_f32_mm(x, *packed, q.shape[0], bits)
    want = x.double() @ w.t()
    assert out.dtype == torch.float32 and out.shape == (70, q.shape[0])
    assert torch.allclose(out.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert_rows_alone(lambda rows: ops.q_f32_mm(rows, *packed, q.shape[0], bits), x, out)


@pytest.mark.isa_path
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_q_bf16_mm_is_bf16_products_on_the_weights_and_batch_invariant(ops, bits):
    """Prompt rows on bfloat16 activations: the weights rounded to bfloat16 times x, summed in float32, rounded
    once; each row the same bits whatever the rows around it (1-4 rows widen in registers, more on a panel)."""
    if is_avx2_build(ops):  # no bf16 dot products there: it says so
        q, d, m, _ = coded_weights(4)
        with pytest.raises(RuntimeError, match="q_bf16_mm needs the AVX-512 build"):
            ops.q_bf16_mm(torch.randn(3, q.shape[1]).bfloat16(), *kernels.pack_panels(q, d, m, 4), q.shape[0], 4)
        return
    if not kernels.has_bf16_dot():
        pytest.skip(f"not run: q_bf16_mm's AVX-512 build needs a level with bf16 dot products (here: {cpu.level()}; "
                    f"the CPU lacks {cpu.missing_flags('avx512_bf16') or 'nothing'})")
    assert_bf16_products_rows_alone(ops.q_bf16_mm, bits)


def assert_bf16_products_rows_alone(mm, bits: int) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """``mm`` (q_bf16_mm's arguments) on coded panels (bits 4, 8) or dense bf16 ones (16): the weights rounded to
    bfloat16 times x, summed in float32, rounded once, each row the same bits alone. Returns (x, packed, out)."""
    q, d, m, w = coded_weights(4 if bits == 16 else bits)
    w16 = w.float().bfloat16()  # what the kernel widens coded weights to: w in float32, rounded once
    packed = kernels.pack_dense_panels(w16) if bits == 16 else kernels.pack_panels(q, d, m, bits)
    x = torch.randn(70, q.shape[1]).bfloat16()
    out = mm(x, *packed, q.shape[0], bits)
    want = x.double() @ w16.double().t()
    assert out.dtype == torch.bfloat16 and out.shape == (70, q.shape[0])
    assert torch.allclose(out.double(), want, rtol=2**-8, atol=1e-5 * want.abs().max().item())
    assert_rows_alone(lambda rows: mm(rows, *packed, q.shape[0], bits), x, out)
    return x, packed, out


@pytest.mark.isa_path
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_q_bf16_mm_on_bf16_tiles_is_bf16_products_and_batch_invariant(ops, bits):
    """On an AMX CPU every bfloat16 panel row (prompt rows; every row of a dense bf16 engine) goes on bf16 tiles
    (TDPBF16PS), one row included, 16 rows per tile: a row's sums keep one order whatever the batch. Where the CPU
    has no AMX, the tiles are their software model (tiles.h), which needs no bf16 instructions."""
    unit = ops.tile_unit()
    if unit == "none":
        pytest.skip("not run: the tile kernels are in the AVX-512 builds (this is the AVX2 one)")
    x, packed, out = assert_bf16_products_rows_alone(ops.q_bf16_mm_tiles, bits)
    if unit == "amx":  # and q_bf16_mm itself takes the tiles there
        assert torch.equal(ops.q_bf16_mm(x, *packed, out.shape[1], bits), out)


@pytest.mark.isa_path
@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_q8_linear_rows_do_not_depend_on_the_batch(cls):
    torch.manual_seed(1)
    weight = torch.randn(80, 576) * 0.05  # a group of 16 blocks, then a pair
    on_torch, ours = cls.quantize(weight), cls.quantize(weight)
    install_matmuls(on_torch, weight.bfloat16(), torch.bfloat16, on_kernels=False, prompts=False)
    install_matmuls(ours, weight.bfloat16(), torch.bfloat16, on_kernels=True, prompts=False)
    x = torch.randn(9, 576).bfloat16()
    together = ours(x)
    for i in range(9):
        assert torch.equal(together[i], ours(x[i : i + 1])[0])
    assert not torch.equal(on_torch(x), together)  # it really is another kernel than torch's


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_codes_come_back_out_of_torchs_packing_as_from_the_weights(cls):
    """Our kernels take (q, d, m): read back from torch's packed weights (an engine directory's), or computed
    from the float32 weights directly, they are the same bits."""
    torch.manual_seed(2)
    weight = torch.randn(64, 96) * 0.05
    for got, want in zip(cls.quantize(weight).codes(), cls.codes_of(weight), strict=True):
        assert torch.equal(got, want)
    if cls is Int4Linear:
        q, s, z = int4_groups(weight)
        assert torch.equal(cls.codes_of(weight)[0], q)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"),
                         [(9, 3, 64), (4, 4, 32), (16, 2, 128), (32, 8, 128), (10, 2, 48)])
@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float32, torch.float16)])
@pytest.mark.parametrize("bf16_dot", [False, True], ids=["fma", "bf16-dot"])
def test_paged_decode_matches_gathered_attention(ops, dtype, cache_dtype, heads, kv_heads, dim, bf16_dot):
    """Keys scattered over the cache in blocks, contexts of different lengths (tails of 16 included); SmolLM2's
    heads, Llama's and Mixtral's (32, 8, 128), and other query heads per KV head and head sizes (the AVX-512 body
    unrolls the served models' shapes, the AVX2 body's register tiles depend on both); a float16 cache under
    float32 queries (CacheConfig.kv_cache_dtype); scores on bf16 dot products where the engine takes them."""
    if bf16_dot and not kernels.has_bf16_dot():
        pytest.skip("not run: this CPU (or level) has no bf16 dot products")
    torch.manual_seed(3)
    batch, block = 5, 16
    cache = torch.randn(2, kv_heads, 80 * block, dim).to(cache_dtype)
    lengths = torch.tensor([1, 16, 17, 70, 200])
    width = 13
    tables = torch.randperm(80)[: batch * width].view(batch, width)
    q = torch.randn(batch, heads, dim).to(dtype)
    if bf16_dot and is_avx2_build(ops):  # the AVX2 build has no bf16 dot products: it says so
        with pytest.raises(RuntimeError, match="bf16 dot products need the AVX-512 build"):
            ops.paged_decode(q, cache, tables, lengths, block, dim**-0.5, bf16_dot)
        return
    out = ops.paged_decode(q, cache, tables, lengths, block, dim**-0.5, bf16_dot)
    kv = cache.view(2, kv_heads, -1, block * dim).index_select(2, tables.flatten())
    kv = kv.view(2, kv_heads, batch, width * block, dim).double()
    want = decode_attention(q.double(), kv[0], kv[1], decode_bias(lengths, width * block).double(), dim**-0.5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert out.dtype == dtype
    assert torch.allclose(out.double(), want, atol=tol)
    for i in range(batch):  # each sequence alone gives the same bits
        alone = ops.paged_decode(q[i : i + 1].contiguous(), cache, tables[i : i + 1].contiguous(),
                                 lengths[i : i + 1].contiguous(), block, dim**-0.5, bf16_dot)
        assert torch.equal(alone[0], out[i])


@pytest.mark.isa_path
def test_engine_rows_are_the_same_bits_alone_chunked_cached_and_batched():
    """The default engine (int4 on VNNI, attention on the kernel): a request's log-probs do not change by one
    bit whether it runs alone, in a crowd that splits its prompt into chunks, or from the prefix cache."""
    from conftest import ENGINE_DIR, require_engine

    from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
    from scalellm.engine.engine import LLMEngine
    from scalellm.engine.sequence import SamplingParams
    from scalellm.tokenization import load_tokenizer

    require_engine()
    engine = LLMEngine(EngineConfig(engine_dir=str(ENGINE_DIR), dtype="auto", cache=CacheConfig(num_blocks=256),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=40)))
    engine.start()
    try:
        text = load_tokenizer(ENGINE_DIR).encode((Path(__file__).parent / "data" / "perplexity_text.txt").read_text())
        prompts = [text.ids[start : start + length] for start, length in ((0, 70), (100, 45), (200, 90))]
        params = SamplingParams(max_tokens=12, stop_token_ids=(0,), return_log_probs=True)
        alone = [engine.generate([ids], params)[0] for ids in prompts]
        crowd = engine.generate([prompts[i % len(prompts)] for i in range(18)], params)  # 16 rows on AMX's tiles
    finally:
        engine.stop()
    assert any(out.num_cached_tokens > 0 for out in crowd)  # some prompts did come from the prefix cache
    for i, out in enumerate(crowd):
        assert out.token_ids == alone[i % len(prompts)].token_ids
        assert out.log_probs == alone[i % len(prompts)].log_probs


@pytest.mark.isa_path
@pytest.mark.parametrize(("dtype", "prompts_quantized"), [("auto", False), ("auto", True), ("bfloat16", False)])
def test_layers_in_one_kernel_call_give_the_python_layers_bits(dtype, prompts_quantized):
    """Generated rows (and prompt rows, where prompts are quantised) run the decoder stack in one kernel call
    (kernels/decoder.cpp): a request's tokens and log-probs are the Python layers' to the bit, alone and batched."""
    from conftest import ENGINE_DIR, require_engine

    from scalellm.config import CacheConfig, EngineConfig
    from scalellm.engine.engine import LLMEngine
    from scalellm.engine.sequence import SamplingParams

    require_engine()
    config = EngineConfig(engine_dir=str(ENGINE_DIR), dtype=dtype, unquantized_prompts=not prompts_quantized,
                          cache=CacheConfig(num_blocks=128, prefix_caching=False))
    engine = LLMEngine(config)
    engine.start()
    prompts = [[(7 * i + 13 * j) % 20000 + 100 for j in range(20 + 9 * i)] for i in range(3)]
    params = SamplingParams(max_tokens=8, stop_token_ids=(), return_log_probs=True)
    try:
        model = engine.runner.model
        assert model.stack is not None and model.stack.num_layers == len(model.layers)
        fused = engine.generate(prompts, params) + engine.generate(prompts[:1], params)
        model.stack = None  # every step through the Python layers
        layered = engine.generate(prompts, params) + engine.generate(prompts[:1], params)
    finally:
        engine.stop()
    for one, other in zip(fused, layered, strict=True):
        assert one.token_ids == other.token_ids
        assert one.log_probs == other.log_probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_ops_match_the_torch_ops_they_replace(ops, dtype):
    """RMSNorm (+ residual add), RoPE + cache write and silu * mul against the torch code they replace
    (scalellm/models/layer_ops.py's TorchOps)."""
    import torch.nn.functional as F

    from scalellm.models.layer_ops import TorchOps, apply_rope
    from scalellm.models.llama import RMSNorm, RotaryEmbedding

    torch_ops = TorchOps()

    torch.manual_seed(4)
    rows, hidden, heads, kv_heads, dim = 37, 576, 9, 3, 64  # 37: threads and row tails
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = torch.randn(hidden).to(dtype)

    def torch_norm(x: torch.Tensor) -> torch.Tensor:
        return torch_ops.norm(x, norm.weight, 1e-5)

    x, delta = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    assert torch.allclose(ops.rms_norm(x.clone(), None, norm.weight, 1e-5).float(), torch_norm(x).float(), **tol)
    residual = x.clone()
    assert torch.allclose(ops.rms_norm(residual, delta, norm.weight, 1e-5).float(), torch_norm(x + delta).float(),
                          **tol)
    assert torch.equal(residual, x + delta)  # the residual add happened in place, rounded as torch rounds it

    gate_up = torch.randn(rows, 2 * 1536).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    assert torch.allclose(ops.silu_mul(gate_up).float(), (F.silu(gate) * up).float(), **tol)

    rope = RotaryEmbedding(dim, 2048, 100000.0)
    positions, slots = torch.randint(0, 2048, (rows,)), torch.randperm(512)[:rows]
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim).to(dtype)
    cache = torch.zeros(2, kv_heads, 512, dim, dtype=dtype)
    q = ops.rope_kv(qkv, rope.cos, rope.sin, positions, cache, slots, heads, kv_heads)
    table = torch_ops.rope_inputs(rope.cos, rope.sin, positions, dtype)
    qk = apply_rope(qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim), table)
    assert torch.equal(q, qk[:, :heads])  # rounded where torch's ops round: the same bits
    assert torch.equal(cache[0, :, slots].transpose(0, 1), qk[:, heads:])
    assert torch.equal(cache[1, :, slots].transpose(0, 1), qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim))
    if dtype == torch.float32:  # a float16 cache (CacheConfig.kv_cache_dtype): the same K and V, rounded once
        half = torch.zeros(2, kv_heads, 512, dim, dtype=torch.float16)
        assert torch.equal(ops.rope_kv(qkv, rope.cos, rope.sin, positions, half, slots, heads, kv_heads), q)
        assert torch.equal(half[0, :, slots].transpose(0, 1), qk[:, heads:].half())
        assert torch.equal(half[1, :, slots].transpose(0, 1),
                           qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim).half())


@pytest.mark.parametrize("vocab", [49152, 37, 5])  # SmolLM2's; a tail after 8-lane chunks; shorter than a chunk
def test_argmax_rows_is_torchs_argmax(ops, vocab):
    """The greedy token of every row is torch.argmax's: the first of tied maxima, the first NaN of a row that has
    one, index 0 of a row of -inf, -0.0 and 0.0 as equals; on one row and on many (threads)."""
    torch.manual_seed(5)
    logits = torch.randn(70, vocab)
    logits[1, :] = float("-inf")
    logits[2, vocab // 2] = logits[2, vocab - 1] = logits[2].max() + 1  # a tie: the first wins
    logits[3, vocab - 1] = float("nan")
    logits[4, 3 % vocab] = float("nan")
    logits[4, vocab - 1] = float("inf")
    logits[5, :] = 0.0
    logits[5, ::2] = -0.0
    logits[6, vocab - 1] = float("inf")
    for rows in (logits[:1], logits[:7], logits):
        assert torch.equal(ops.argmax_rows(rows.contiguous()), rows.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(logits[2:3].contiguous()), torch.tensor([vocab // 2]))


def test_models_the_kernels_cannot_take_keep_torchs_code():
    """paged_decode and the layer ops have fixed register tiles: other head shapes must not reach them."""
    assert kernels.fits(64, 3) and kernels.fits(128, 8)  # SmolLM2, Llama 3 70B / Mixtral
    assert not kernels.fits(72, 1) and not kernels.fits(64, 32)  # head_dim off 16; multi-query with 32 heads


def test_nice_workers_lowers_the_workers_not_the_caller(ops):
    """EngineConfig.worker_nice: Triton's threads should preempt the engine's workers (our kernels' team and
    torch's OpenMP pool), never the engine thread itself, which computes whatever a preempted worker leaves."""

    def nice_of(tid: int) -> int:
        return int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    def team_tids() -> list[int]:
        return [int(t) for t in os.listdir("/proc/self/task")
                if Path(f"/proc/self/task/{t}/comm").read_text().strip() == "scalellm-team"]

    seen: dict[str, object] = {}

    def engine_thread() -> None:  # a fresh thread gets its own OpenMP pool, as the engine's loop thread does
        ops.engine_threads(2)  # this thread's kernels on the team, as on the engine's loop thread
        ops.silu_mul(torch.randn(64, 4096))  # starts the team's worker if no kernel has yet
        ops.torch_threads(2)  # and torch's ops on an OpenMP pool of two
        seen["set"] = ops.nice_workers(7)
        seen["caller"] = nice_of(threading.get_native_id())
        seen["team"] = [nice_of(tid) for tid in team_tids()]
        seen["all"] = sorted(nice_of(int(t)) for t in os.listdir("/proc/self/task"))
        ops.nice_workers(0)

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    assert seen["caller"] == 0
    assert 7 in seen["team"]  # this build's worker (each build loaded has its own team)
    assert seen["set"] == 2 and seen["all"].count(7) == 2  # and torch's one OpenMP worker


def test_kernels_give_the_same_bits_on_any_number_of_threads_and_callers(ops):
    """How work is shared between threads never changes a bit: on the team (team.h; the engine's loop thread)
    and on OpenMP's threads (any other caller), one thread, two, more threads than cores, and two engines'
    threads calling at once (on the team the second runs its calls alone)."""
    torch.manual_seed(5)
    q, d, m, _ = coded_weights(4, n=293, k=576)
    packed = kernels.pack(q, d, m, 4)
    x = torch.randn(70, 576).to(torch.bfloat16)  # 70 rows: grabs of columns from 16 rows on
    heads, kv_heads, dim, block = 9, 3, 64, 16
    cache = torch.randn(2, kv_heads, 64 * block, dim).to(torch.bfloat16)
    tables, lengths = torch.randperm(64)[: 6 * 8].view(6, 8), torch.tensor([1, 16, 17, 70, 100, 128])
    query = torch.randn(6, heads, dim).to(torch.bfloat16)
    gate_up = torch.randn(300, 2 * 1536).to(torch.bfloat16)

    def compute() -> list[torch.Tensor]:
        return [ops.q_q8_mm(x, *packed, 293, 4), ops.q_q8_mm(x[:3].contiguous(), *packed, 293, 4),
                ops.paged_decode(query, cache, tables, lengths, block, dim**-0.5), ops.silu_mul(gate_up)]

    def on_threads(threads: int, calls: int = 1, team: bool = True) -> list[list[torch.Tensor]]:
        got: list[list[torch.Tensor]] = []

        def engine_thread() -> None:  # each engine's loop thread sets its own thread count
            if team:
                ops.engine_threads(threads)
            else:
                torch.set_num_threads(threads)
            got.extend(compute() for _ in range(calls))

        thread = threading.Thread(target=engine_thread)
        thread.start()
        thread.join()
        return got

    [alone] = on_threads(1)
    for threads, team in [(2, True), (4, True), (2, False), (4, False)]:
        for i, out in enumerate(on_threads(threads, team=team)[0]):
            assert torch.equal(out, alone[i]), f"output {i} on {threads} threads, team {team}"
    results: list[list[list[torch.Tensor]]] = []
    callers = [threading.Thread(target=lambda: results.append(on_threads(2, calls=20))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(results) == 2
    for outs in (outs for got in results for outs in got):
        assert all(torch.equal(out, want) for out, want in zip(outs, alone, strict=True))

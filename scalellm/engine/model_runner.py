"""Owns the model and its paged KV cache; turns a scheduled step into one forward pass."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from scalellm.config import CacheConfig, EngineConfig, ModelConfig
from scalellm.engine.sampler import wide_passes
from scalellm.engine.scheduler import ScheduledWork
from scalellm.engine.sequence import Sequence
from scalellm.models import kernels
from scalellm.models.attention import decode_bias, kv_cache_shape, length_groups, prefill_mask
from scalellm.models.engine_dir import load_engine_state, load_packed_weights
from scalellm.models.engine_meta import EngineMeta
from scalellm.models.formats import AUTO, WeightFormat, resolve_format
from scalellm.models.layer_ops import KernelOps, LayerOps, TorchOps
from scalellm.models.linear import finalize, quantize_model
from scalellm.models.llama import LlamaForCausalLM, RotaryEmbedding
from scalellm.models.step import PROMPT_ROWS, PrefillChunk, QueryGroup, RowSplit, Step

log = logging.getLogger(__name__)
WIDE_SAMPLER_ELEMENTS = 1 << 20  # rows x vocabulary from which the sampler's torch ops get every engine thread


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def num_cache_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = 2 * cfg.num_layers * cache.block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    budget = cache.memory_bytes
    if cache.memory_fraction is not None:
        budget = int(available_memory_bytes(device) * cache.memory_fraction)
    return max(1, budget // per_block)


def engine_weight_format(config: EngineConfig) -> WeightFormat:
    """The format to run this engine in here: EngineConfig's dtype, and its quantize or the recorded one."""
    quantize = config.quantize
    if quantize is None:
        recorded = EngineMeta.read(config.engine_dir).quantize
        quantize = recorded if config.dtype in (AUTO, "bfloat16") else "none"
    device = torch.device(config.device).type
    return resolve_format(config.dtype, quantize, device, on_kernels(config))


def on_kernels(config: EngineConfig) -> bool:
    """Whether the engine's matmuls run on our CPU kernels (they build here and the config wants them)."""
    return torch.device(config.device).type == "cpu" and config.cpu_kernels and kernels.load() is not None


def layer_ops(config: EngineConfig, cfg: ModelConfig) -> LayerOps:
    """Our kernels for the layers' other operations where they build and take the model's heads, else torch's."""
    if on_kernels(config) and kernels.fits(cfg.head_dim, cfg.num_heads // cfg.num_kv_heads):
        return KernelOps(kernels.load(), bf16_dot=kernels.has_bf16_dot())
    if on_kernels(config):
        log.info("head_dim %d with %d query heads per KV head: torch's attention and layer code serve",
                 cfg.head_dim, cfg.num_heads // cfg.num_kv_heads)
    return TorchOps()


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.format = engine_weight_format(config)
        self.dtype = self.format.dtype
        hf_config, state = load_engine_state(config.engine_dir)
        self.model_config = c = ModelConfig.from_hf(hf_config)
        self.ops = layer_ops(config, c)
        self.threads = 1  # torch's threads for the sampler's wide passes (own_threads)
        with torch.device("meta"):
            model = LlamaForCausalLM(c, self.ops)
        state = {k: v.to(device=self.device, dtype=self.dtype) for k, v in state.items()}
        model.load_hf_state_dict(state, assign=True)
        del state
        kernel_matmuls = on_kernels(config)
        quantized = self.format.quantize != "none"
        self.split_prompts = quantized and config.unquantized_prompts  # steps tell the layers their prompt rows
        if quantized:
            packed = load_packed_weights(config.engine_dir, self.format.quantize)
            if packed is None:
                log.warning("no %s weights built for this torch on this CPU in %s: quantising now",
                            self.format.quantize, config.engine_dir)
            quantize_model(model, self.format.quantize, self.dtype, packed, kernel_matmuls, config.unquantized_prompts)
        finalize(model, kernel_matmuls)
        fused = model.fuse_layers()
        model.rope = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta).to(self.device)
        self.model = model.eval()
        on = f", on our {kernels.best_isa()} kernels" if kernel_matmuls else ", on torch's kernels"
        on += " (generated rows' layers in one call)" if fused else ""
        log.info("model weights: %s%s", self.format.name, on)
        if config.cache.kv_cache_dtype not in ("auto", "activations"):
            raise ValueError(f"kv_cache_dtype must be auto or activations (got {config.cache.kv_cache_dtype!r})")
        half_cache = (config.cache.kv_cache_dtype == "auto" and self.ops.in_place and quantized
                      and self.dtype == torch.float32)  # only our kernels read and write a float16 cache
        self.kv_dtype = torch.float16 if half_cache else self.dtype
        self.block_size = config.cache.block_size
        self.num_blocks = num_cache_blocks(self.model_config, config.cache, self.kv_dtype, self.device)
        self.kv_caches = [
            torch.zeros(kv_cache_shape(self.num_blocks * self.block_size, c.num_kv_heads, c.head_dim),
                        dtype=self.kv_dtype, device=self.device)
            for _ in range(c.num_layers)
        ]
        self._block_offsets = torch.arange(self.block_size)
        if half_cache:
            log.info("KV cache: float16 (kv_cache_dtype auto: quantised weights on float32 activations)")

    def own_threads(self) -> None:
        """On the engine's loop thread, where our kernels serve: they run on a team of torch's thread count
        (kernels/team.h), torch's own ops on this thread alone. An OpenMP worker of torch's spins for ~9 ms
        after each parallel op, on the core the team's worker needs (a step at one sequence takes ~8 ms)."""
        if isinstance(self.ops, KernelOps):
            self.threads = torch.get_num_threads()
            self.ops.ops.engine_threads(self.threads)

    @contextlib.contextmanager
    def sampler_threads(self, seqs: list[Sequence]) -> Iterator[None]:
        """torch's ops on all of own_threads' threads inside, for a sampler that makes vocabulary-wide passes
        (sampling, log-probs) over many rows: at 64 rows, temperature sampling takes 6 ms on 2 threads, 17 on one."""
        wide = len(seqs) * self.model_config.vocab_size >= WIDE_SAMPLER_ELEMENTS and wide_passes(seqs)
        if not wide or self.threads < 2:
            yield
            return
        self.ops.ops.torch_threads(self.threads)
        try:
            yield
        finally:
            self.ops.ops.torch_threads(1)

    def nice_workers(self, nice: int) -> None:
        """Our kernels' workers and the calling thread's OpenMP workers at ``nice`` where our kernels serve
        (EngineConfig.worker_nice): the caller computes whatever work a preempted worker has not taken."""
        if nice and isinstance(self.ops, KernelOps):
            self.ops.ops.nice_workers(nice)

    def _context_slots(self, table: list[int], length: int) -> torch.Tensor:
        """[length] cache slots of one sequence's first ``length`` tokens (its block table covers them)."""
        blocks = torch.tensor(table[: -(-length // self.block_size)], dtype=torch.long)
        return (blocks.unsqueeze(1) * self.block_size + self._block_offsets).flatten()[:length]

    def _decode_groups(self, rows: list[int], tables: list[list[int]], lengths: list[int],
                       all_rows: bool) -> list[QueryGroup]:
        if self.ops.in_place:  # reads each context in place: one group, padded tables only
            unique: list[list[int]] = []  # a prompt's rows share its sequence's table: pad it once, repeat it
            counts: list[int] = []
            for table in tables:
                if unique and table is unique[-1]:
                    counts[-1] += 1
                else:
                    unique.append(table)
                    counts.append(1)
            width = max(len(t) for t in unique)
            blocks = torch.tensor([t + [0] * (width - len(t)) for t in unique])
            if len(unique) < len(tables):
                blocks = blocks.repeat_interleave(torch.tensor(counts), dim=0)
            index = None if all_rows else torch.tensor(rows, device=self.device)
            return [QueryGroup(index, blocks.to(self.device), None, torch.tensor(lengths, device=self.device))]
        groups = []
        for members in length_groups(lengths):
            members.sort()
            lens = [lengths[i] for i in members]
            width = -(-max(lens) // self.block_size)
            blocks = torch.tensor([tables[i][:width] + [0] * (width - len(tables[i])) for i in members])  # 0: padding
            bias = decode_bias(torch.tensor(lens), width * self.block_size)
            whole = all_rows and len(members) == len(rows)
            index = None if whole else torch.tensor([rows[i] for i in members], device=self.device)
            groups.append(QueryGroup(index, blocks.to(self.device), _to(bias, self.device)))
        return groups

    def _build_step(self, work: list[ScheduledWork]) -> tuple[list[int], list[int], Step, list[int]]:
        """The step's flat token batch: (token ids, positions, Step, the rows that sample)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        prompt_rows: list[bool] = []
        bs = self.block_size
        for w in work:
            seq, start = w.seq, w.seq.num_computed
            end = start + w.num_tokens
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            prompt_rows.extend(p < len(seq.prompt_ids) for p in range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if w.num_tokens == 1 or self.ops.in_place:  # in place: every row as one query
                decode_rows.extend(range(row, row + w.num_tokens))
                decode_tables.extend([table] * w.num_tokens)
                decode_lengths.extend(range(start + 1, end + 1))
            else:
                context = self._context_slots(table, end)
                prefills.append(PrefillChunk(row, w.num_tokens, context.to(self.device),
                                             _to(prefill_mask(w.num_tokens, end), self.device)))
            if w.samples:
                sample_rows.append(row + w.num_tokens - 1)
        decodes = []
        if decode_rows:
            decodes = self._decode_groups(decode_rows, decode_tables, decode_lengths, not prefills)
        step = Step(torch.tensor(slot_mapping, device=self.device), self.block_size, decodes, prefills)
        if self.split_prompts:
            step.rows = RowSplit.of(prompt_rows)
            step.head_rows = RowSplit.of([prompt_rows[r] for r in sample_rows])
        return input_ids, positions, step, sample_rows

    def run(self, work: list[ScheduledWork]) -> torch.Tensor:
        """Forward the step; returns float32 logits on the CPU for the rows that sample, in work order."""
        input_ids, positions, step, sample_rows = self._build_step(work)
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            step,
        )
        if not sample_rows:
            return torch.empty(0, self.model_config.vocab_size)
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return self.model.compute_logits(hidden, step.head_rows).cpu()

    def score(self, token_ids: list[int], as_prompt: bool = True) -> torch.Tensor:
        """[n, vocab] float32 logits of every position of one sequence, teacher-forced in one step on a cache of its
        own (the engine's is untouched): every row on a prompt token's path, or (``as_prompt`` False) on a
        generated token's. For accuracy checks (perplexity, agreement between weight formats)."""
        n, c = len(token_ids), self.model_config
        caches = [torch.zeros(kv_cache_shape(n, c.num_kv_heads, c.head_dim), dtype=self.kv_dtype, device=self.device)
                  for _ in range(c.num_layers)]
        slots = torch.arange(n, device=self.device)
        if self.ops.in_place:  # one block of n slots; row i attends to the first i + 1
            step = Step(slots, n, [QueryGroup(None, torch.zeros(n, 1, dtype=torch.long, device=self.device), None,
                                              torch.arange(1, n + 1, device=self.device))])
        else:
            step = Step(slots, n, prefills=[PrefillChunk(0, n, slots)])
        if as_prompt and self.split_prompts:
            step.rows = step.head_rows = PROMPT_ROWS
        hidden = self.model(torch.tensor(token_ids, device=self.device), slots, caches, step)
        return self.model.compute_logits(hidden, step.head_rows).cpu()


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)

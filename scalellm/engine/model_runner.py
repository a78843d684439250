"""Owns the model and its paged KV cache; turns a scheduled step into one forward pass."""

from __future__ import annotations

import torch

from scalellm.config import CacheConfig, EngineConfig, ModelConfig
from scalellm.engine.scheduler import ScheduledWork
from scalellm.models.attention import AttentionBatch, DecodeGroup, PrefillChunk
from scalellm.models.checkpoint import load_engine_state
from scalellm.models.llama import LlamaForCausalLM, RotaryEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        hf_config, state = load_engine_state(config.engine_dir)
        self.model_config = ModelConfig.from_hf(hf_config)
        with torch.device("meta"):
            model = LlamaForCausalLM(self.model_config)
        state = {k: v.to(device=self.device, dtype=self.dtype) for k, v in state.items()}
        model.load_hf_state_dict(state, assign=True)
        c = self.model_config
        model.rope = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta).to(self.device)
        self.model = model.eval()
        self.block_size = config.cache.block_size
        self.num_blocks = num_cache_blocks(self.model_config, config.cache, self.dtype, self.device)
        c = self.model_config
        self.kv_caches = [
            torch.zeros(2, self.num_blocks * self.block_size, c.num_kv_heads, c.head_dim,
                        dtype=self.dtype, device=self.device)
            for _ in range(c.num_layers)
        ]

    def _context_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long)
        slots = (table.unsqueeze(1) * self.block_size + torch.arange(self.block_size)).flatten()
        return slots[:length]

    def _build_batch(self, work: list[ScheduledWork]) -> tuple[list[int], list[int], AttentionBatch, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        for w in work:
            seq, start = w.seq, w.seq.num_computed
            end = start + w.num_tokens
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            context = self._context_slots(seq.block_table, end)
            slot_mapping.append(context[start:end])
            if w.num_tokens == 1:
                decode_rows.append(row)
                decode_slots.append(context)
            else:
                prefills.append(PrefillChunk(row, w.num_tokens, context.to(self.device)))
            if w.samples:
                sample_rows.append(row + w.num_tokens - 1)
        decode = None
        if decode_rows:
            width = max(len(s) for s in decode_slots)
            slots = torch.zeros(len(decode_rows), width, dtype=torch.long)
            mask = torch.zeros(len(decode_rows), 1, 1, width, dtype=torch.bool)
            for i, s in enumerate(decode_slots):
                slots[i, : len(s)] = s
                mask[i, ..., : len(s)] = True
            decode = DecodeGroup(torch.tensor(decode_rows, device=self.device), slots.to(self.device),
                                 mask.to(self.device))
        batch = AttentionBatch(torch.cat(slot_mapping).to(self.device), decode, prefills)
        return input_ids, positions, batch, sample_rows

    def run(self, work: list[ScheduledWork]) -> torch.Tensor:
        """Forward the step; returns float32 logits on the CPU for the rows that sample, in work order."""
        input_ids, positions, batch, sample_rows = self._build_batch(work)
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            batch,
        )
        if not sample_rows:
            return torch.empty(0, self.model_config.vocab_size)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return logits.cpu()

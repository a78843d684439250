"""Fixed-size KV-cache blocks: reference counts, per-sequence block tables and a prefix cache.

A full block is keyed by hash(previous block's key, its token ids), so a key names a whole prefix.
Freed blocks keep their key and stay findable until they are reused (least recently freed first),
so requests sharing a system prompt or chat history skip recomputing those blocks.
"""

from __future__ import annotations

from collections import OrderedDict

from scalellm.engine.sequence import Sequence


def block_key(previous: int | None, tokens: list[int]) -> int:
    return hash((previous, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # key -> block holding that prefix
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_hit_tokens = 0

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    # ---- growing a sequence ----
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_tokens`` more computed tokens."""
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            key = self.block_keys[block]
            if key is not None:  # evict the prefix it held
                self.cached.pop(key, None)
                self.block_keys[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed = 0

    # ---- prefix cache ----
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq`` (at least its last token is left to compute)."""
        if not self.prefix_caching:
            return []
        blocks, key, bs = [], None, self.block_size
        tokens = seq.token_ids
        for start in range(0, len(tokens) - 1 - bs + 1, bs):
            key = block_key(key, tokens[start : start + bs])
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def free_after_taking(self, blocks: list[int]) -> int:
        """Free blocks left once ``blocks`` (some possibly free but cached) are taken."""
        return len(self.free_blocks) - sum(1 for b in blocks if self.ref_counts[b] == 0)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Start ``seq`` (holding no blocks) on the matched cached blocks."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_keys.append(self.block_keys[block])
        seq.num_computed = len(blocks) * self.block_size
        seq.num_cached_tokens += seq.num_computed
        self.prefix_hit_tokens += seq.num_computed

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks that became full in the last step, so later requests can share them."""
        if not self.prefix_caching:
            return
        bs, tokens = self.block_size, seq.token_ids
        for i in range(len(seq.block_keys), seq.num_computed // bs):
            previous = seq.block_keys[-1] if seq.block_keys else None
            key = block_key(previous, tokens[i * bs : (i + 1) * bs])
            seq.block_keys.append(key)
            block = seq.block_table[i]
            if key not in self.cached:
                self.cached[key] = block
                self.block_keys[block] = key

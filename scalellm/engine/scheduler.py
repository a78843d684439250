"""Continuous batching: decide which sequences run in the next step and with how many tokens.

Each step has a token budget.  Running decodes go first (one token each), then prefill work FCFS,
chunked so a long prompt never takes more than the budget left.  When the cache runs out of blocks the
most recently arrived running sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scalellm.config import SchedulerConfig
from scalellm.engine.block_manager import BlockManager
from scalellm.engine.sequence import Sequence, Status


@dataclass
class ScheduledWork:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed in this step

    @property
    def samples(self) -> bool:
        """Whether this step completes the sequence's known tokens, so a new one is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledWork]:
        budget = self.config.max_num_batched_tokens
        work: list[ScheduledWork] = []
        # 1. Running sequences in arrival order: decodes and unfinished prefill chunks.
        for seq in sorted(self.running, key=lambda s: s.arrival_time):
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, n):
                victim = max(self.running, key=lambda s: s.arrival_time)
                self._preempt(victim)
                work = [w for w in work if w.seq is not victim]
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, n)
            work.append(ScheduledWork(seq, n))
            budget -= n
        budget = self.config.max_num_batched_tokens - sum(w.num_tokens for w in work)
        # 2. Admit waiting sequences FCFS while budget, sequence slots and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            n = min(len(seq) - len(cached) * self.blocks.block_size, budget)
            need = -(-(len(cached) * self.blocks.block_size + n) // self.blocks.block_size) - len(cached)
            if need > self.blocks.free_after_taking(cached):
                break
            self.waiting.popleft()
            self.blocks.take_prefix(seq, cached)
            self.blocks.grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            work.append(ScheduledWork(seq, n))
            budget -= n
        return work

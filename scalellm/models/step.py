"""What one engine step hands the model besides the tokens: where each row attends (built once by the model runner
and shared by every layer), and which rows are prompt tokens.

A step's rows are the flat batch of every scheduled sequence's new tokens. A prompt token's row multiplies the
weights by unquantised activations, a generated token's by int8-quantised ones (scalellm/models/linear.py): the
split is by token, never by what a row is batched with, so a request's text does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RowSplit:
    """Which rows of a matmul's input are prompt tokens. ``prompt`` / ``generated``: their indices, only when the
    rows mix both kinds (otherwise ``all_prompt`` says which kind they all are). ``first_prompt``: in a mixed
    split whose prompt rows are all the rows from there on (the scheduler's usual order: decodes, then prompt
    chunks), so a matmul takes the two kinds as two slices instead of gathering and scattering rows."""

    all_prompt: bool = False
    flags: torch.Tensor | None = None  # bool per row, in a mixed split only
    prompt: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    first_prompt: int | None = None

    @staticmethod
    def of(flags: torch.Tensor | list[bool]) -> RowSplit:
        flags = torch.as_tensor(flags, dtype=torch.bool)
        num_prompt = int(flags.sum())
        if 0 < num_prompt < len(flags):
            first = len(flags) - num_prompt
            tail = bool(flags[first:].all())
            return RowSplit(False, flags, flags.nonzero().flatten(), (~flags).nonzero().flatten(),
                            first if tail else None)
        return RowSplit(num_prompt == len(flags) and num_prompt > 0)

    @property
    def mixed(self) -> bool:
        return self.flags is not None

    def select(self, rows: torch.Tensor) -> RowSplit:
        """The split of the given rows (the tokens routed to one MoE expert)."""
        return RowSplit.of(self.flags[rows]) if self.flags is not None else self


GENERATED_ROWS = RowSplit()  # every row a generated token's
PROMPT_ROWS = RowSplit(all_prompt=True)


@dataclass
class QueryGroup:
    """Rows that each attend as one query over their own sequence's first keys: decodes, and on our kernel
    (``LayerOps.in_place``) every row of the step, prompt rows included."""

    token_index: torch.Tensor | None  # [B] rows of the step's flat token batch; None = all rows, in order
    blocks: torch.Tensor  # [B, W] cache blocks of each row's sequence (padded): K = W * block_size keys
    bias: torch.Tensor | None  # [B, 1, K] float32, 0 for a real key and -inf for padding; None = no padding
    lengths: torch.Tensor | None = None  # [B] int64 keys each row attends to: the kernel's, instead of a bias


@dataclass
class PrefillChunk:
    """Many queries of one sequence, causal over its cached prefix plus the chunk (torch's attention only)."""

    start: int  # rows [start, start + num_new) of the flat token batch
    num_new: int
    slots: torch.Tensor  # [context_len] slots of the whole context, chunk included
    mask: torch.Tensor | None = None  # [num_new, context_len] for a later chunk; None = plain causal


@dataclass
class Step:
    """Everything the layers need of one step beyond the tokens and positions (built by the model runner)."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    block_size: int
    queries: list[QueryGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    rows: RowSplit = GENERATED_ROWS  # the step's rows
    head_rows: RowSplit = GENERATED_ROWS  # the rows the lm_head computes (those that sample)

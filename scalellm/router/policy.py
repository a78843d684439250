"""Which replica gets a request: least outstanding tokens, or the prefix-aware variant.

Least outstanding tokens: every request in flight counts its prompt tokens plus ``max_tokens`` against its
replica until it finishes; a new request goes to the healthy replica with the fewest (ties in turn).

Prefix-aware (like SGLang's cache-aware router): each replica remembers the prompt prefixes it was sent, as
hashes of the prompt cut into chunks of ``chunk_chars`` characters (chained, so a hash names the whole prefix
up to that chunk), in an LRU table. A request follows its longest remembered prefix when that covers at least
``match_ratio`` of the prompt and the replica holding it is within ``balance_tokens`` of the least loaded one;
otherwise it goes to the least loaded. Either way the chosen replica now remembers the request's prefixes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Load:
    """What the policy needs of a replica: its outstanding tokens and the prefixes it was sent."""

    name: str
    outstanding_tokens: int = 0
    in_flight: int = 0
    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)


def prefix_hashes(text: str, chunk_chars: int) -> list[int]:
    """Chained hashes of ``text``'s whole chunks: entry i names ``text[: (i + 1) * chunk_chars]``."""
    hashes, h = [], 0
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        h = hash((h, text[start:start + chunk_chars]))
        hashes.append(h)
    return hashes


def matched_chunks(load: Load, hashes: Sequence[int]) -> int:
    n = 0
    for h in hashes:
        if h not in load.prefixes:
            break
        n += 1
    return n


def remember(load: Load, hashes: Sequence[int], capacity: int) -> None:
    for h in hashes:
        load.prefixes[h] = None
        load.prefixes.move_to_end(h)
    while len(load.prefixes) > capacity:
        load.prefixes.popitem(last=False)


@dataclass
class Choice:
    index: int
    by_prefix: bool


class Policy:
    def __init__(self, prefix_aware: bool = False, match_ratio: float = 0.5, balance_tokens: int = 4096,
                 chunk_chars: int = 32, table_entries: int = 1 << 16) -> None:
        self.prefix_aware = prefix_aware
        self.match_ratio = match_ratio
        self.balance_tokens = balance_tokens
        self.chunk_chars = chunk_chars
        self.table_entries = table_entries
        self._turn = itertools.count()

    def choose(self, loads: Sequence[Load], candidates: Sequence[int], prompt: str) -> Choice:
        """Pick one of ``candidates`` (indices into ``loads``, the healthy replicas not yet tried)."""
        if not candidates:
            raise ValueError("no candidate replica")
        start = next(self._turn) % len(candidates)
        rotated = list(candidates[start:]) + list(candidates[:start])  # ties go round in turn
        least = min(rotated, key=lambda i: loads[i].outstanding_tokens)
        choice = Choice(least, by_prefix=False)
        if self.prefix_aware:
            hashes = prefix_hashes(prompt, self.chunk_chars)
            if hashes:
                best = max(rotated, key=lambda i: matched_chunks(loads[i], hashes))
                matched = matched_chunks(loads[best], hashes)
                gap = loads[best].outstanding_tokens - loads[least].outstanding_tokens
                covered = matched * self.chunk_chars / max(1, len(prompt))
                if matched and covered >= self.match_ratio and gap <= self.balance_tokens:
                    choice = Choice(best, by_prefix=True)
                remember(loads[choice.index], hashes, self.table_entries)
        return choice

"""When a returned sequence's engine outputs become responses: coalescing and ``stream_interval``.

The engine reports each step's new tokens; the ``llm`` model's sender thread takes every report waiting for
it at once and keeps one pending output per sequence, merging a report into the one not yet sent (vLLM V1's
``RequestOutputCollector`` merges delta outputs the same way when its consumer falls behind). A streamed
sequence's pending output becomes a response

- at once when it holds the sequence's first token(s): that response is never merged with later tokens, so
  the first token is never held back;
- at once when it is the last (it has a finish reason);
- otherwise once it holds ``stream_interval`` tokens or more, after the sender has taken every report waiting.

So with ``stream_interval`` 1 a sender that keeps up sends every token alone, and one that is behind sends
each sequence's pending tokens as one response; with ``stream_interval`` k > 1 a sender that keeps up sends
the tokens 1, 2..k+1, k+2..2k+1, ... and the rest with the last (vLLM's rule: the first token, then every
k tokens, and the last). A sequence that is not streamed gets one response, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scalellm.engine.sequence import RequestOutput


def merge(pending: RequestOutput | None, out: RequestOutput) -> RequestOutput:
    """What one response for ``pending`` then ``out`` says: ``out``'s state (counts, finish reason, timings)
    with both's new tokens and log-probs, in order. ``pending`` must be a previous result of this function
    (its lists are extended in place, so merging n reports costs O(n))."""
    if pending is None:
        log_probs = None if out.new_log_probs is None else list(out.new_log_probs)
        return replace(out, new_token_ids=list(out.new_token_ids), new_log_probs=log_probs)
    pending.new_token_ids.extend(out.new_token_ids)
    if pending.new_log_probs is not None:
        pending.new_log_probs.extend(out.new_log_probs or ())
    return replace(out, new_token_ids=pending.new_token_ids, new_log_probs=pending.new_log_probs)


@dataclass
class Pacer:
    """One returned sequence's output not yet sent, and the rule for sending it (module doc)."""

    interval: int | None  # stream_interval; None: not streamed, one response at the end
    pending: RequestOutput | None = None
    sent: bool = False  # a response of this sequence has gone out

    def add(self, out: RequestOutput) -> bool:
        """Merge ``out`` into the pending output; whether it must go out now (first tokens or last)."""
        self.pending = merge(self.pending, out)
        if out.finish_reason is not None:
            return True
        return self.interval is not None and not self.sent and bool(self.pending.new_token_ids)

    def due(self) -> bool:
        """Whether the pending output holds ``stream_interval`` tokens (asked once the waiting reports are in)."""
        return (self.interval is not None and self.pending is not None
                and len(self.pending.new_token_ids) >= self.interval)

    def take(self) -> RequestOutput | None:
        """The pending output, to send now."""
        out, self.pending = self.pending, None
        self.sent = self.sent or out is not None
        return out

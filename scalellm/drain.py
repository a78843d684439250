"""The drain signal from the launcher to every ``llm`` model instance: a small file holding a deadline.

Triton gives a Python model no way to learn that the server received SIGTERM (its ``finalize`` runs only
once every request in flight has ended), and a control request would reach one instance of several. So the
launcher puts ``$SCALELLM_DRAIN_FILE`` into the server's environment and, on SIGTERM, writes the drain
deadline (wall-clock seconds) there; each instance polls the file, stops admitting, and ends whatever still
runs at the deadline with finish reason ``"shutdown"``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DRAIN_FILE_ENV = "SCALELLM_DRAIN_FILE"


def write_drain_file(path: str | Path, grace_s: float) -> float:
    """Announce a drain ending ``grace_s`` from now; returns the deadline (``time.time()`` seconds)."""
    deadline = time.time() + grace_s
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"deadline_unix_s": deadline, "grace_s": grace_s}))
    os.replace(tmp, path)  # readers never see a half-written file
    return deadline


class DrainWatch:
    """Polled by the llm model: ``deadline()`` is None until a drain is announced, then its deadline."""

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path else (Path(p) if (p := os.environ.get(DRAIN_FILE_ENV)) else None)
        self._deadline: float | None = None

    def deadline(self) -> float | None:
        if self._deadline is None and self.path is not None:
            try:
                self._deadline = float(json.loads(self.path.read_text())["deadline_unix_s"])
            except (OSError, ValueError, KeyError, TypeError):
                return None  # no drain yet (or the file is being replaced: try again next poll)
        return self._deadline

"""Watch a serving tritonserver; say when it can no longer serve, so the launcher can exit non-zero.

Triton keeps reporting ready when a Python-backend stub dies (it would restart the stub at the model's next
``execute``), but the requests that stub held never get their final response and their clients would wait
forever. So a dead stub counts as a fault: the launcher kills the server and exits with ``EXIT_UNHEALTHY``,
and the supervisor (compose's ``restart:``) starts a fresh one. The ``llm`` model makes its own stub exit
when its engine thread dies (after failing the requests it held), so that fault takes the same path.
"""

from __future__ import annotations

import signal
import time

from scalellm.serving.process import TritonServer

EXIT_UNHEALTHY = 3
POLL_S = 0.5
UNREADY_LIMIT_S = 10.0  # tolerate a slow health answer on a loaded machine, not a server that stays unready


class Watchdog:
    def __init__(self, server: TritonServer, unready_limit_s: float = UNREADY_LIMIT_S) -> None:
        self.server = server
        self.unready_limit_s = unready_limit_s
        self.stubs = server.stub_pids()  # taken once the server is ready: every model's stub is up
        self._unready_since: float | None = None
        self._last_ready_check = 0.0

    def problem(self) -> str | None:
        """Why the server can no longer serve, or None. Cheap: call it every ``POLL_S``."""
        if self.server.draining or not self.server.running:
            return None
        alive = self.server.stub_pids()
        dead = {pid: name for pid, name in self.stubs.items() if pid not in alive}
        if dead:
            names = ", ".join(f"{name} (pid {pid})" for pid, name in dead.items())
            return f"Python backend stub exited: {names}"
        self.stubs.update(alive)
        now = time.monotonic()
        if now - self._last_ready_check >= 1.0:
            self._last_ready_check = now
            if self.server.is_ready():
                self._unready_since = None
            elif self._unready_since is None:
                self._unready_since = now
            elif now - self._unready_since > self.unready_limit_s:
                return f"not ready for {self.unready_limit_s:.0f} s"
        return None

    def watch(self) -> int:
        """Until the server exits: its exit code, or ``EXIT_UNHEALTHY`` after killing an unhealthy one.

        During a drain (``server.begin_drain``) it sends Triton its SIGTERM once the engines are empty."""
        stopping = False
        while self.server.running:
            if self.server.draining and not stopping and self.server.drained():
                print("[scalellm.serving] drained: stopping tritonserver", flush=True)
                self.server.send_signal(signal.SIGTERM)
                stopping = True
            problem = self.problem()
            if problem:
                print(f"[scalellm.serving] unhealthy: {problem}; stopping tritonserver (exit "
                      f"{EXIT_UNHEALTHY})", flush=True)
                self.server.kill_group()
                self.server.wait()
                return EXIT_UNHEALTHY
            time.sleep(POLL_S)
        code = self.server.wait()
        return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it

"""Start, health-check, watch, drain and stop a real ``tritonserver`` on a model repository.

``install`` finds the server and prepares its Python backend directory; ``process`` runs one server
(start, readiness, drain, stop with its stubs); ``watchdog`` turns a dead stub or a lasting unreadiness
into a non-zero exit; ``cli`` is ``python -m scalellm.serving``.
"""

from scalellm.serving.cli import main
from scalellm.serving.install import TritonInstall, locate_tritonserver, prepare_backend_dir, server_env
from scalellm.serving.process import (
    DEFAULT_HOST,
    DEFAULT_READY_TIMEOUT_S,
    ServerNotReady,
    TritonServer,
    free_ports,
    port_open,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_READY_TIMEOUT_S",
    "ServerNotReady",
    "TritonInstall",
    "TritonServer",
    "free_ports",
    "locate_tritonserver",
    "main",
    "port_open",
    "prepare_backend_dir",
    "server_env",
]

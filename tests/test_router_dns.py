"""The router finding its replicas by DNS (``--replica-dns NAME:HTTP_PORT:GRPC_PORT``), as it does behind a
Kubernetes headless Service: a replica is added behind the name, another removed from it and then added back
while requests stream through the router, and none of them fails.

The name resolves through the system resolver (getaddrinfo, /etc/hosts then DNS), the path the router takes in a
cluster. The test gives the router its own /etc/hosts: the router runs in a private mount namespace
(``unshare --mount``) where a temporary hosts file is bind-mounted over /etc/hosts, so the machine's own file is
never touched and the mount goes with the process. The replicas listen on loopback aliases (127.0.0.1 is the
session's server, 127.0.0.2 a second tritonserver on the same ports), since every address behind a name serves
the same ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import CLIENT_TIMEOUT_S, MODEL_DIR, RunningServer, model_repository, poll, settled
from routerstack import EXIT_TIMEOUT_S, READY_TIMEOUT_S, RouterProcess, metric, scrape, small_model_dir

from scalellm.serving import TritonServer, free_ports
from scalellm_client import Client

pytestmark = pytest.mark.server
NAME = "replicas.scalellm.test"  # .test: reserved, never a real name
SECOND_HOST = "127.0.0.2"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
WORKERS = 4
MAX_TOKENS = 24
PHASE_TIMEOUT_S = 120.0


def namespace_wrapper(hosts: Path) -> list[str]:
    """The command prefix that runs a program with ``hosts`` as its /etc/hosts (skips when none can)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: it gives the router a private /etc/hosts")
    namespace = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
    wrapper = [*namespace, "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    probe = subprocess.run([*wrapper, "getent", "hosts", NAME], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot give a process its own /etc/hosts here ({probe.stderr.strip() or probe.returncode}):"
                    " needs root or unprivileged user namespaces")
    return wrapper


def write_hosts(path: Path, *addresses: str) -> None:
    """Rewrite ``path`` in place (the bind mount follows the inode, not the name)."""
    with open(path, "r+") as f:
        f.truncate()
        f.write("127.0.0.1 localhost\n" + "".join(f"{address} {NAME}\n" for address in addresses))


class Traffic:
    """``WORKERS`` threads sending one request after another through the router until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[str] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]

    def _work(self) -> None:
        with Client(self.url, timeout_s=CLIENT_TIMEOUT_S) as client:
            while not self.stopping.is_set():
                try:
                    self.answers.append(client.generate(PROMPT, max_tokens=MAX_TOKENS).text)
                except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                    self.errors.append(repr(exc))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT_S)

    def wait_for(self, answers: int) -> None:
        target = len(self.answers) + answers
        assert poll(lambda: len(self.answers) + len(self.errors), lambda n: n >= target, PHASE_TIMEOUT_S) >= target


@pytest.fixture
def second_replica(server: RunningServer, tmp_path: Path) -> Iterator[TritonServer]:
    """A tritonserver on 127.0.0.2 with the session server's HTTP and gRPC ports."""
    model_repository()
    http_port, grpc_port = urlsplit(server.http_url).port, urlsplit(f"//{server.grpc_url}").port
    assert http_port and grpc_port
    replica = TritonServer(small_model_dir(MODEL_DIR, tmp_path) / "model_repository", host=SECOND_HOST,
                           http_port=http_port, grpc_port=grpc_port, metrics_port=free_ports(1, SECOND_HOST)[0],
                           log_file=tmp_path / "replica-2.log", extra_args=[f"--exit-timeout-secs={EXIT_TIMEOUT_S}"])
    replica.start()
    try:
        replica.wait_ready(READY_TIMEOUT_S)
        yield replica
    finally:
        replica.stop()


def test_replicas_added_and_removed_behind_a_name_fail_no_request(
        server: RunningServer, second_replica: TritonServer, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.touch()
    write_hosts(hosts, "127.0.0.1")
    first = f"127.0.0.1:{second_replica.http_port}"
    second = f"{SECOND_HOST}:{second_replica.http_port}"
    name = f"{NAME}:{second_replica.http_port}:{second_replica.grpc_port}"
    router = RouterProcess([], second_replica.model_repository.parent, tmp_path / "router.log",
                           args=["--replica-dns", name, "--dns-interval", "0.5"], wrapper=namespace_wrapper(hosts))

    def routed(replica: str) -> float | None:
        """Requests the router sent to ``replica``; None once the replica's series are gone."""
        page = scrape(f"{router.http_url}/metrics")
        if f'replica="{replica}"' not in page:
            return None
        return metric(page, "scalellm_router_requests_routed_total", replica=replica)

    def first_served() -> float:
        return metric(scrape(server.metrics_url), "nv_inference_count", model="ensemble")

    with router, Traffic(router.grpc_url) as traffic:
        traffic.wait_for(WORKERS)
        assert routed(second) is None  # not behind the name yet

        write_hosts(hosts, "127.0.0.1", SECOND_HOST)  # a replica appears
        assert (poll(lambda: routed(second), lambda n: bool(n), PHASE_TIMEOUT_S) or 0) > 0, router.log_file.read_text()
        traffic.wait_for(2 * WORKERS)

        write_hosts(hosts, SECOND_HOST)  # the first one leaves: its requests finish, then its series go
        assert poll(lambda: routed(first), lambda n: n is None, PHASE_TIMEOUT_S) is None, router.log_file.read_text()
        served_before = settled(first_served)
        routed_before = routed(second) or 0
        traffic.wait_for(2 * WORKERS)
        assert first_served() == served_before  # nothing more went to the replica that left
        # and the traffic went on to the second: of those 2 * WORKERS answers, at most WORKERS were already routed
        # (in flight) when routed_before was read
        assert (routed(second) or 0) >= routed_before + WORKERS

        write_hosts(hosts, "127.0.0.1", SECOND_HOST)  # and comes back
        assert (poll(lambda: routed(first), lambda n: bool(n), PHASE_TIMEOUT_S) or 0) > 0, router.log_file.read_text()

    log = router.log_file.read_text()
    assert traffic.errors == [], f"{len(traffic.errors)} request(s) failed: {traffic.errors[:3]}\n{log}"
    assert len(set(traffic.answers)) == 1 and len(traffic.answers) >= 5 * WORKERS, traffic.answers[:3]
    assert f"replica {second} found by DNS (ready): added" in log
    assert f"replica {first} no longer in DNS: removed" in log
    print(f"{len(traffic.answers)} requests through the router while a replica joined, one left and came back, "
          "none failed")

#!/usr/bin/env -S sh -c 'exec "$(dirname "$0")/../.venv/bin/python" "$0" "$@"'
"""Serving benchmark, the vLLM ``benchmark_serving`` way, plus where the time goes.

    .venv/bin/python scripts/benchmark.py                       # starts its own server on free ports
    .venv/bin/python scripts/benchmark.py --concurrency 1 8 32 64 --targets grpc http engine \\
        --input-len 32 --output-len 64 --output build/bench.json --plot build/bench.png

Targets: the ensemble over gRPC streaming, over HTTP ``generate_stream`` (``http``: our client's asyncio
transport; ``sse``: the peers' client below, a thread and ``http.client`` per request, so ours and the peers are
read alike), and the engine in process (no Triton, same engine directory, same token ids, same weight format) as
the baseline; ``router``: gRPC streaming through the ScaleLLM router (``python -m scalellm.router``, started here
in front of the same one replica unless ``--router-url``), so ``--targets grpc router`` measures what the router
adds. ``--router-replicas N`` serves the router target with ``scripts/serve.sh --replicas N`` instead (each
replica on its share of the cores), started once the other targets are done and their server stopped, so
``--targets grpc router --router-replicas 2`` compares N replicas through the router with one replica on every
core, side by side in one run. Peers, prompts of the same lengths and words (every level has its own, see
``synthetic_prompt``), streaming, in the same run, each reported as ours / peer per level: ``--peer llamacpp`` adds
llama.cpp's ``llama-server`` on the same GGUF twice, as shipped (Q4_1, target ``llamacpp-q4_1``) and re-quantised by
llama.cpp's own ``llama-quantize`` (target ``llamacpp-q8_0``), both through ``llamacpp_server.sh serve`` (which
builds llama.cpp once, ~12 min on 2 cores); ``--peer vllm`` adds vLLM's CPU build serving the same engine
directory's dense weights (target ``vllm``, through ``vllm_cpu_server.sh serve``, which installs it once). The
scripts are in ``--peer-tools`` (default ``../shared/tools``):

    .venv/bin/python scripts/benchmark.py --peer llamacpp vllm --targets grpc engine --concurrency 1 8 32 64 \\
        --input-len 128 --output-len 128 --output build/bench-vs-peers.json --plot build/bench-vs-peers.png

Each level keeps C requests in flight (or, with ``--request-rate``, sends them as a Poisson process capped at C).
Output lengths are fixed (``end_id=-1``). Per request: TTFT, TPOT = (E2E - TTFT) / (n - 1), ITL, E2E, and the
responses (streamed messages) it took; per level, responses per generated token (1 when every token travels alone,
less when the server merges tokens into one response). End-to-end efficiency = target tokens/s over engine tokens/s
at the same C, from the same run. With ``--stages-every N`` every Nth request asks for ``return_perf_metrics`` and
splits its E2E into stages (client -> llm arrival, queue, prefill, decode, last token -> client), and Triton's
statistics API gives preprocessing / postprocessing compute per execution; off by default, as the 10 tensors it
adds to each of those requests' responses are a load the engine target and the peers do not carry.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalellm.router.launch import spawn  # noqa: E402
from scalellm.serving import TritonServer, free_ports  # noqa: E402
from scalellm.serving.process import stub_model  # noqa: E402
from scalellm_client import AsyncClient  # noqa: E402

PEER_TOOLS = ROOT.parent / "shared" / "tools"
WORDS = "the of and to in is was for on that with as by at from his her they this which".split()
STAGES = ("client -> llm arrival", "queue", "prefill", "decode", "last token -> client")


RUN = random.SystemRandom().randrange(10**6)  # this run's prompts are new to any server's prefix cache


def synthetic_prompt(index: int, words: int, level: int) -> str:
    """Prompts of a fixed length (each of these common words is one token for SmolLM2), distinct across requests,
    levels (``level``: the level's place in the run, so two targets on one server, or one target twice, never
    share a prompt) and runs: a prefix-cache hit on a prompt from an earlier level would flatter a server that
    caches (llama.cpp's peer runs without its prompt cache)."""
    head = f"Request {RUN}.{level}.{index}: "
    return head + " ".join(WORDS[(index * 7 + i * 3) % len(WORDS)] for i in range(words))


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {"mean": values[0], "p50": values[0], "p90": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"mean": statistics.fmean(values), "p50": q[49], "p90": q[89], "p99": q[98]}


def request_metrics(start: float, token_times: list[float], tokens: int, responses: int) -> dict:
    ttft = token_times[0] - start if token_times else float("nan")
    e2e = (token_times[-1] if token_times else time.perf_counter()) - start
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "responses": responses,
            "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0,
            "itl": [b - a for a, b in zip(token_times, token_times[1:], strict=False)]}


# ---- through Triton -------------------------------------------------------------------------------------
async def one_request(client: AsyncClient, prompt: str, output_len: int, stages: bool = True,
                      stream_interval: int | None = None) -> dict:
    """One streamed request; ``stages``: also ask for the engine's timestamps (10 more tensors a response);
    ``stream_interval``: None leaves it to the server."""
    sent_ns, start = time.time_ns(), time.perf_counter()
    times, tokens, timings, responses = [], 0, None, 0
    async for chunk in client.stream_chunks(prompt, max_tokens=output_len, end_id=-1, return_perf_metrics=stages,
                                            stream_interval=stream_interval):
        responses += 1
        if chunk.num_tokens > tokens:
            times.extend([time.perf_counter()] * (chunk.num_tokens - tokens))
            tokens = chunk.num_tokens
        timings = chunk.timings or timings
    done_ns = time.time_ns()
    result = request_metrics(start, times, tokens, responses)
    if timings:
        marks = [sent_ns, timings["arrival_time_ns"], timings["first_scheduled_time_ns"],
                 timings["first_token_time_ns"], timings["last_token_time_ns"], done_ns]
        result["stages"] = {name: (b - a) / 1e9 for name, a, b in zip(STAGES, marks, marks[1:], strict=False)}
    return result


async def run_server_level(url: str, protocol: str, c: int, n: int, level: int, args) -> tuple[list[dict], float]:
    async with AsyncClient(url, protocol=protocol, timeout_s=600) as client:
        await one_request(client, synthetic_prompt(99_999, args.input_len, level), 2)  # warm the connection
        gate, rng = asyncio.Semaphore(c), random.Random(0)

        async def gated(i: int, delay: float) -> dict:
            await asyncio.sleep(delay)
            async with gate:
                stages = args.stages_every > 0 and i % args.stages_every == 0
                return await one_request(client, synthetic_prompt(i, args.input_len, level), args.output_len, stages,
                                         args.stream_interval)

        delays, t = [], 0.0
        for _ in range(n):
            delays.append(t)
            t += rng.expovariate(args.request_rate) if args.request_rate else 0.0
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i, d) for i, d in enumerate(delays)))
        return results, time.perf_counter() - start


def start_router(http_url: str, grpc_url: str) -> tuple[subprocess.Popen, str]:
    """``python -m scalellm.router`` in front of the one replica at ``http_url``/``grpc_url``; its gRPC address."""
    replica = f"{urlsplit(http_url).hostname}:{urlsplit(http_url).port}:{grpc_url.rsplit(':', 1)[1]}"
    http_port, grpc_port = free_ports(2)
    log = open(ROOT / "build" / "benchmark-router.log", "wb")  # noqa: SIM115 - the child keeps its own copy
    process = subprocess.Popen([sys.executable, "-m", "scalellm.router", "--replica", replica,
                                "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return process, f"127.0.0.1:{grpc_port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the router did not get ready (see build/benchmark-router.log)")


def start_router_replicas(model_dir: str, replicas: int) -> tuple[subprocess.Popen, str]:
    """``scripts/serve.sh --replicas N`` on free ports; its gRPC address."""
    http_port, grpc_port = free_ports(2)
    process, _ = spawn(Path(model_dir), replicas, http_port, grpc_port, ROOT / "build" / "benchmark-replicas")
    return process, f"127.0.0.1:{grpc_port}"


def triton_compute_ns(http_url: str, model: str) -> tuple[int, int]:
    """(total compute_infer ns, executions) of a model so far, from Triton's statistics API."""
    with urllib.request.urlopen(f"{http_url}/v2/models/{model}/stats") as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_stats"]["compute_infer"]["ns"]), int(stats["execution_count"])


# ---- in process -----------------------------------------------------------------------------------------
def run_engine_level(engine, tokenizer, c: int, n: int, level: int, args) -> tuple[list[dict], float]:
    from scalellm.engine.sequence import SamplingParams, Sequence

    gate, finished, lock = threading.Semaphore(c), threading.Semaphore(0), threading.Lock()
    results: list[dict] = []
    params = SamplingParams(max_tokens=args.output_len, stop_token_ids=())

    def submit(i: int) -> None:
        start, times, seen, outputs = time.perf_counter(), [], [0], [0]

        def on_output(out) -> None:
            now = time.perf_counter()
            times.extend([now] * (out.num_output_tokens - seen[0]))
            seen[0] = out.num_output_tokens
            outputs[0] += 1
            if out.finish_reason is not None:
                with lock:
                    results.append(request_metrics(start, times, out.num_output_tokens, outputs[0]))
                gate.release()
                finished.release()

        ids = tokenizer.encode(synthetic_prompt(i, args.input_len, level)).ids
        engine.submit(Sequence(f"bench-{c}-{i}", ids, params, on_output))

    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(n):
        gate.acquire()
        submit(i)
        if args.request_rate:
            time.sleep(rng.expovariate(args.request_rate))
    for _ in range(n):
        finished.acquire()
    return results, time.perf_counter() - start


# ---- CPU per generated token: where a level's CPU went --------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int | str) -> tuple[str, int, float] | None:
    """(name, parent pid, user + system CPU seconds of all its threads) of a process; None once it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat.rsplit(")", 1)[1].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def python_program(pid: int) -> str | None:
    """What a Python process runs: the module after ``-m`` (``scalellm.router``, vLLM's
    ``vllm.entrypoints.openai.api_server``), else its script's name; None for ``-c`` or once it has exited."""
    import psutil  # the bench extra, as tqdm and matplotlib

    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg == "-c":
            return None
        if not arg.startswith("-"):
            return Path(arg).name
    return None


def tree_cpu_seconds(roots: list[int]) -> dict[str, float]:
    """CPU seconds so far of the processes under ``roots`` (them included), summed by name."""
    stats = {int(e.name): st for e in Path("/proc").iterdir() if e.name.isdigit() and (st := proc_stat(e.name))}
    tree, grew = {r for r in roots if r in stats}, True
    while grew:
        more = {pid for pid, (_, ppid, _) in stats.items() if ppid in tree and pid not in tree}
        tree |= more
        grew = bool(more)
    seconds: dict[str, float] = {}
    for pid in tree:
        comm = stats[pid][0]  # a Python-backend stub by its model, another Python by its program, else its comm
        name = stub_model(pid) or (comm.startswith("python") and python_program(pid)) or comm
        seconds[name] = seconds.get(name, 0.0) + stats[pid][2]
    return seconds


def machine_cpu_seconds() -> tuple[float, float, float]:
    """(busy, idle, stolen) CPU seconds of all the machine's CPUs since boot (/proc/stat). Stolen: time a virtual
    machine's CPUs were ready to run but the hypervisor ran something else (another tenant)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = values[3] + values[4], values[7]  # idle + iowait; steal
    return (sum(values[:7]) - idle) / CLOCK_TICKS, idle / CLOCK_TICKS, steal / CLOCK_TICKS


@dataclass
class CpuSnapshot:
    server: dict[str, float]  # the target's server processes by name
    this_process: float  # the benchmark: the client, or for the engine target the engine itself
    machine_busy: float
    machine_idle: float
    machine_stolen: float

    @staticmethod
    def take(server_roots: list[int]) -> CpuSnapshot:
        times = os.times()
        return CpuSnapshot(tree_cpu_seconds(server_roots), times.user + times.system, *machine_cpu_seconds())


def listening_pid(port: int) -> int | None:
    """The process on this machine listening on TCP ``port`` (a server given by ``--url``), None if none is seen."""
    import psutil  # the bench extra, as tqdm and matplotlib

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:  # not allowed to list them here
        return None
    return next((c.pid for c in connections
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid), None)


def server_roots(target: str, server: TritonServer | None, router: subprocess.Popen | None,
                 peers: dict[str, PeerServer], url_pid: int | None) -> list[int]:
    """The processes that serve ``target`` (their descendants count too): none for the engine target (this
    process); for a server given by ``--url``, the local process listening on its port (``url_pid``), if any."""
    if target == "engine":
        return []
    if target in peers:
        return [peers[target].process.pid]
    roots = [router.pid] if target == "router" and router is not None else []
    if server is not None and server.pid is not None:
        roots.append(server.pid)
    elif url_pid is not None:
        roots.append(url_pid)
    return roots


def cpu_per_token(before: CpuSnapshot, after: CpuSnapshot, tokens: int) -> dict:
    """Milliseconds of CPU per generated token: the server's processes by name, this process, the rest of the
    machine (anything else running: a leftover process shows here); and the shares of all CPUs' time left idle
    and stolen by the hypervisor (a noisy neighbour: the level ran on less CPU than the machine has)."""
    per = 1e3 / max(1, tokens)
    server = {name: (s - before.server.get(name, 0.0)) * per for name, s in after.server.items()}
    this = (after.this_process - before.this_process) * per
    busy = after.machine_busy - before.machine_busy
    idle = after.machine_idle - before.machine_idle
    stolen = after.machine_stolen - before.machine_stolen
    total = max(1e-9, busy + idle + stolen)
    return {"server": server, "this_process": this,
            "rest_of_machine": max(0.0, busy * per - this - sum(server.values())),
            "idle_share": idle / total, "stolen_share": stolen / total}


def cpu_table(levels: list[dict]) -> str:
    lines = ["CPU per generated token, ms (user + system from /proc; this process: the client, the engine itself for "
             "the engine target)", "",
             "| target | C | server | server's processes | this process | rest of the machine | CPUs idle | stolen |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for lv in levels:
        cpu = lv["cpu_ms_per_token"]
        parts = sorted(cpu["server"].items(), key=lambda item: -item[1])
        detail = ", ".join(f"{name} {ms:.2f}" for name, ms in parts if ms >= 0.005) or "-"
        lines.append(f"| {lv['target']} | {lv['concurrency']} | {sum(cpu['server'].values()):.2f} | {detail} | "
                     f"{cpu['this_process']:.2f} | {cpu['rest_of_machine']:.2f} | {cpu['idle_share']:.0%} | "
                     f"{cpu['stolen_share']:.0%} |")
    return "\n".join(lines)


# ---- the peers: llama.cpp's llama-server (two weight formats) and vLLM's CPU build ---------------------------
def sse_events(response) -> object:
    """The JSON of each ``data:`` line of a Server-Sent Events body, until ``[DONE]`` or its end."""
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def post_stream(url: str, path: str, body: dict):
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url}{path} answered {response.status}: {response.read()[:200]!r}")
    return conn, response


def llamacpp_request(url: str, prompt: str, output_len: int) -> dict:
    """One streamed ``/completion``, end of sequence ignored; a token per streamed event (its final count from
    the server's timings). Every event counts as a response, the last (no token, the timings) too."""
    start = time.perf_counter()  # TTFT from the send, as for our targets (headers may wait for a token)
    conn, response = post_stream(url, "/completion", {
        "prompt": prompt, "n_predict": output_len, "ignore_eos": True, "stream": True, "cache_prompt": False,
        "temperature": 0.0})
    times, responses = [], 0
    for event in sse_events(response):
        now = time.perf_counter()
        responses += 1
        if event.get("stop"):
            total = event.get("timings", {}).get("predicted_n", len(times))
            times.extend([now] * (total - len(times)))
            break
        times.append(now)
    conn.close()
    return request_metrics(start, times, len(times), responses)


def openai_request(url: str, prompt: str, output_len: int) -> dict:
    """One streamed OpenAI ``/v1/completions`` (vLLM: ``ignore_eos``, and ``continuous_usage_stats`` so each
    chunk says how many tokens are out, since one chunk may carry several). Chunks with a choice count as
    responses; the usage-only chunk at the end does not."""
    start = time.perf_counter()  # TTFT from the send, as for our targets (headers may wait for a token)
    conn, response = post_stream(url, "/v1/completions", {
        "model": PEER_MODEL_NAME, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "stream": True,
        "temperature": 0.0, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    times, responses = [], 0
    for event in sse_events(response):
        now = time.perf_counter()
        usage = event.get("usage") or {}
        tokens = usage.get("completion_tokens", len(times) + (1 if event.get("choices") else 0))
        responses += bool(event.get("choices"))
        times.extend([now] * (tokens - len(times)))
    conn.close()
    return request_metrics(start, times, len(times), responses)


def triton_sse_request(url: str, prompt: str, output_len: int) -> dict:
    """Ours read the peers' way (target ``sse``): one streamed ``generate_stream`` of the ensemble over Triton's
    HTTP, by the peers' client (a thread, ``http.client``); each event's ``num_output_tokens`` counts the tokens
    out so far."""
    start = time.perf_counter()  # TTFT from the send, as for our targets (headers may wait for a token)
    conn, response = post_stream(url, "/v2/models/ensemble/generate_stream", {
        "text_input": prompt, "max_tokens": output_len, "end_id": -1, "stream": True})
    times, responses = [], 0
    for event in sse_events(response):
        now = time.perf_counter()
        if "error" in event:
            raise RuntimeError(f"{url}: {event['error']}")
        responses += 1
        times.extend([now] * (int(event["num_output_tokens"]) - len(times)))
    conn.close()
    return request_metrics(start, times, len(times), responses)


PEER_MODEL_NAME = "smollm2"  # vllm_cpu_server.sh's --served-model-name


@dataclass(frozen=True)
class PeerSpec:
    """One peer server: its target name, how ``--peer-tools``' script starts it, how to talk to it."""

    target: str
    script: str
    args: tuple[str, ...]
    env: dict[str, str]
    request: Callable[[str, str, int], dict]


def peer_specs(peers: list[str], slots: int, engine_dir: Path) -> list[PeerSpec]:
    specs = []
    if "llamacpp" in peers:  # the GGUF as shipped (Q4_1), and llama.cpp's best batched format on it
        specs += [PeerSpec("llamacpp-q4_1", "llamacpp_server.sh", ("serve",), {"NP": str(slots)}, llamacpp_request),
                  PeerSpec("llamacpp-q8_0", "llamacpp_server.sh", ("serve",), {"NP": str(slots), "QUANT": "Q8_0"},
                           llamacpp_request)]
    if "vllm" in peers:
        specs.append(PeerSpec("vllm", "vllm_cpu_server.sh", ("serve", str(engine_dir)), {"MAX_SEQS": str(slots)},
                              openai_request))
    return specs


class PeerServer:
    """A peer's ``serve`` script on a free port, in its own session (the script and the server stop together)."""

    def __init__(self, spec: PeerSpec, tools: Path, log_file: Path) -> None:
        self.script = tools / spec.script
        if not self.script.is_file():
            raise SystemExit(f"{self.script}: no such file (--peer-tools: the directory of the peers' scripts)")
        self.spec, self.log_file = spec, log_file
        self.port = free_ports(1)[0]
        self.url = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env, "PORT": str(self.port)}
        with open(self.log_file, "w") as log:
            self.process = subprocess.Popen(["bash", str(self.script), *self.spec.args], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 2400) -> None:
        """Wait for /health (a first start also builds or installs the peer: minutes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.spec.target} exited with {self.process.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise SystemExit(f"{self.spec.target} not healthy after {timeout_s:.0f} s; see {self.log_file}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)


def run_threaded_level(request: Callable[[str, str, int], dict], url: str, c: int, n: int, level: int,
                       args) -> tuple[list[dict], float]:
    """C threads keep C requests in flight until n are done (closed loop, as for our targets): the peers' client,
    and ours the same way (target ``sse``)."""
    request(url, synthetic_prompt(99_999, args.input_len, level), 2)  # warm
    todo: queue.Queue[int] = queue.Queue()
    for i in range(n):
        todo.put(i)
    results: list[dict] = []

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            results.append(request(url, synthetic_prompt(i, args.input_len, level), args.output_len))

    threads = [threading.Thread(target=worker) for _ in range(c)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def peer_ratios(levels: list[dict], peer: str) -> list[dict]:
    """Ours (the first Triton target measured, else the engine) over the peer, per concurrency level."""
    rows = []
    for theirs in (lv for lv in levels if lv["target"] == peer):
        c = theirs["concurrency"]
        ours = next((lv for t in ("grpc", "http", "sse", "engine") for lv in levels
                     if lv["target"] == t and lv["concurrency"] == c), None)
        if ours is None:
            continue
        rows.append({"concurrency": c, "ours": ours["target"], "ours_tok_s": ours["output_throughput"],
                     "peer_tok_s": theirs["output_throughput"],
                     "throughput_ratio": ours["output_throughput"] / theirs["output_throughput"],
                     "ours_tpot_p50_s": ours["tpot_s"]["p50"], "peer_tpot_p50_s": theirs["tpot_s"]["p50"],
                     "tpot_ratio": ours["tpot_s"]["p50"] / theirs["tpot_s"]["p50"]})
    return rows


def peer_table(rows: list[dict], peer: str) -> str:
    lines = [f"| C | {peer} tok/s (TPOT p50) | ours tok/s (TPOT p50) | ours / {peer} tok/s | TPOT ours / {peer} |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['peer_tok_s']:.1f} ({r['peer_tpot_p50_s'] * 1e3:.1f} ms) | "
                     f"{r['ours_tok_s']:.1f} ({r['ours_tpot_p50_s'] * 1e3:.1f} ms, {r['ours']}) | "
                     f"{r['throughput_ratio']:.2f} | {r['tpot_ratio']:.2f} |")
    return "\n".join(lines)


def level_summary(target: str, c: int, results: list[dict], duration: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    summary = {
        "target": target, "concurrency": c, "requests": len(results), "duration_s": duration,
        "request_throughput": len(results) / duration, "output_throughput": tokens / duration,
        "responses_per_token": sum(r["responses"] for r in results) / max(1, tokens),
        "ttft_s": summarize([r["ttft"] for r in results]), "tpot_s": summarize([r["tpot"] for r in results]),
        "itl_s": summarize([x for r in results for x in r["itl"]]), "e2e_s": summarize([r["e2e"] for r in results]),
    }
    staged = [r for r in results if "stages" in r]
    if staged:
        summary["stages_s"] = {name: summarize([r["stages"][name] for r in staged]) for name in STAGES}
        summary["stages_sum_over_e2e"] = statistics.fmean(
            sum(r["stages"].values()) / r["e2e"] for r in staged)
    return summary


def markdown_table(levels: list[dict]) -> str:
    lines = ["| target | C | req/s | out tok/s | efficiency | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50 ms "
             "| E2E p50/p99 s | responses / token |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        eff = f"{lv['efficiency']:.2f}" if "efficiency" in lv else "-"
        lines.append(
            f"| {lv['target']} | {lv['concurrency']} | {lv['request_throughput']:.2f} | "
            f"{lv['output_throughput']:.1f} | {eff} | {lv['ttft_s']['p50'] * 1e3:.0f} / "
            f"{lv['ttft_s']['p99'] * 1e3:.0f} | {lv['tpot_s']['p50'] * 1e3:.1f} / {lv['tpot_s']['p99'] * 1e3:.1f} | "
            f"{lv['itl_s'].get('p50', 0) * 1e3:.1f} | {lv['e2e_s']['p50']:.2f} / {lv['e2e_s']['p99']:.2f} | "
            f"{lv['responses_per_token']:.3f} |")
    return "\n".join(lines)


def breakdown_table(level: dict) -> str:
    lines = [f"{level['target']}, C = {level['concurrency']}", "",
             "| stage | p50 ms | p99 ms | mean ms |", "|---|---:|---:|---:|"]
    for name, s in level["stages_s"].items():
        lines.append(f"| {name} | {s['p50'] * 1e3:.1f} | {s['p99'] * 1e3:.1f} | {s['mean'] * 1e3:.1f} |")
    for model, per_exec in level.get("triton_compute_ms_per_execution", {}).items():
        lines.append(f"| ({model} compute per execution) | | | {per_exec:.2f} |")
    lines.append(f"| sum of stages / E2E | | | {level['stages_sum_over_e2e']:.3f} |")
    return "\n".join(lines)


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """/proc/cpuinfo's model name and the SIMD flags that decide the weight format (Linux; else unknown)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", []
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("flags\t\t", fields.get("flags", "")).split()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return fields.get("model name\t", "unknown").strip(), [f for f in flags if f in wanted]


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for target in dict.fromkeys(lv["target"] for lv in levels):
        rows = [lv for lv in levels if lv["target"] == target]
        cs = [lv["concurrency"] for lv in rows]
        axes[0].plot(cs, [lv["output_throughput"] for lv in rows], marker="o", label=target)
        axes[1].plot(cs, [lv["ttft_s"]["p50"] * 1e3 for lv in rows], marker="o", label=target)
        axes[2].plot(cs, [lv["tpot_s"]["p50"] * 1e3 for lv in rows], marker="o", label=target)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC host:port of a running server (default: start one)")
    parser.add_argument("--http-url", help="its HTTP URL (for the http target and Triton statistics)")
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "smollm2"))
    parser.add_argument("--targets", nargs="+", default=["grpc", "http", "engine"],
                        choices=["grpc", "http", "sse", "engine", "router"])
    parser.add_argument("--router-url", help="gRPC host:port of a running router (router target; default: start one)")
    parser.add_argument("--router-replicas", type=int, default=0,
                        help="router target: N replicas behind the router (scripts/serve.sh --replicas N), run "
                             "after the other targets with their one-replica server stopped")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--http-concurrency", type=int, nargs="+", help="levels for the http target (default: all)")
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2 x C)")
    parser.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt words (about one token each)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--stream-interval", type=int, metavar="N",
                        help="our targets: ask for a response every N tokens (default: the server's, 1)")
    parser.add_argument("--peer", nargs="+", default=[], choices=["llamacpp", "vllm"],
                        help="also measure llama.cpp's llama-server (the same GGUF, Q4_1 and Q8_0) and/or vLLM's CPU "
                        "build (the same engine directory's dense weights)")
    parser.add_argument("--peer-tools", type=Path, default=PEER_TOOLS,
                        help="the directory of llamacpp_server.sh and vllm_cpu_server.sh (default: %(default)s)")
    parser.add_argument("--stages-every", type=int, default=0, metavar="N",
                        help="ask every Nth request for the engine's timestamps (return_perf_metrics), which split "
                        "E2E into stages; 1 = all, 0 = none (default). They add 10 tensors to every response of "
                        "the request, a cost the engine target and the peers do not carry.")
    parser.add_argument("--output", type=Path, help="JSON results")
    parser.add_argument("--plot", type=Path, help="PNG: throughput, TTFT and TPOT against concurrency")
    args = parser.parse_args()
    from tqdm import tqdm

    server, grpc_url, http_url = None, args.url, args.http_url
    own_router = "router" in args.targets and args.router_url is None
    if grpc_url is None and ({"grpc", "http", "sse"} & set(args.targets) or (own_router and not args.router_replicas)):
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(Path(args.model_dir) / "model_repository", http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, log_file=ROOT / "build" / "benchmark-server.log")
        server.start()
        server.wait_ready(300)
        grpc_url, http_url = server.grpc_url, server.http_url
    port = args.url.rsplit(":", 1)[-1] if args.url else ""
    url_pid = listening_pid(int(port)) if port.isdigit() else None
    router, router_url = None, args.router_url
    if own_router and not args.router_replicas:
        router, router_url = start_router(http_url, grpc_url)
    engine = tokenizer = None
    if "engine" in args.targets:
        from scalellm.config import CacheConfig, EngineConfig
        from scalellm.engine.engine import LLMEngine
        from scalellm.tokenization import load_tokenizer

        engine_dir = Path(args.model_dir) / "engine"  # same knobs as model_repository/llm/config.pbtxt
        from scalellm.models.engine_meta import EngineMeta

        served = EngineMeta.read(engine_dir)  # the served weight format
        engine = LLMEngine(EngineConfig(engine_dir=str(engine_dir), dtype=served.dtype or EngineConfig.dtype,
                                        cache=CacheConfig(memory_bytes=1 << 30)))
        engine.start()
        tokenizer = load_tokenizer(engine_dir)

    peers = {spec.target: PeerServer(spec, args.peer_tools, ROOT / "build" / f"benchmark-{spec.target}.log")
             for spec in peer_specs(args.peer, max(args.concurrency), Path(args.model_dir) / "engine")}
    for peer in peers.values():  # they start (and the first time build or install) side by side
        peer.start()
    for peer in peers.values():
        peer.wait_healthy()
    targets = args.targets + list(peers)
    plan = [(t, c) for c in args.concurrency for t in targets
            if not (t == "http" and args.http_concurrency and c not in args.http_concurrency)]
    if args.router_replicas:  # the replicas take the cores: every other target first, its server stopped
        plan = [step for step in plan if step[0] != "router"] + [step for step in plan if step[0] == "router"]
    levels = []
    try:
        for level_no, (target, c) in enumerate(tqdm(plan, desc="benchmark", unit="level")):
            n = args.requests_per_level or max(4, 2 * c)
            stats_before = {}
            if target == "router" and own_router and router is None:
                if server is not None:
                    server.stop()
                    server = http_url = None
                router, router_url = start_router_replicas(args.model_dir, args.router_replicas)
            roots = server_roots(target, server, router, peers, url_pid)
            cpu_before = CpuSnapshot.take(roots)
            if target == "engine":
                results, duration = run_engine_level(engine, tokenizer, c, n, level_no, args)
            elif target in peers:
                results, duration = run_threaded_level(peers[target].spec.request, peers[target].url, c, n, level_no,
                                                       args)
            elif target == "sse":
                results, duration = run_threaded_level(triton_sse_request, urlsplit(http_url).netloc, c, n, level_no,
                                                       args)
            else:
                if http_url:
                    stats_before = {m: triton_compute_ns(http_url, m) for m in ("preprocessing", "postprocessing")}
                url = {"grpc": grpc_url, "http": http_url, "router": router_url}[target]
                protocol = "http" if target == "http" else "grpc"
                results, duration = asyncio.run(run_server_level(url, protocol, c, n, level_no, args))
            level = level_summary(target, c, results, duration)
            level["cpu_ms_per_token"] = cpu_per_token(cpu_before, CpuSnapshot.take(roots),
                                                      sum(r["tokens"] for r in results))
            if stats_before:
                level["triton_compute_ms_per_execution"] = {}
                for model, (ns0, count0) in stats_before.items():
                    ns1, count1 = triton_compute_ns(http_url, model)
                    level["triton_compute_ms_per_execution"][model] = (ns1 - ns0) / max(1, count1 - count0) / 1e6
            levels.append(level)
            tqdm.write(f"{target:13s} C={c:3d} {level['output_throughput']:7.1f} tok/s  TTFT p50 "
                       f"{level['ttft_s']['p50'] * 1e3:6.0f} ms  TPOT p50 {level['tpot_s']['p50'] * 1e3:5.1f} ms  "
                       f"{level['responses_per_token']:.3f} responses/token")
    finally:
        if router is not None:
            router.send_signal(signal.SIGINT)  # the launcher (--router-replicas) stops its replicas on SIGINT
            router.wait(120)
        if server is not None:
            server.stop()
        if engine is not None:
            engine.stop()
        for peer in peers.values():
            peer.stop()

    baseline = {lv["concurrency"]: lv["output_throughput"] for lv in levels if lv["target"] == "engine"}
    for lv in levels:  # ours end to end over ours in process; the peers have their own tables
        if lv["concurrency"] in baseline and lv["target"] not in peers:
            lv["efficiency"] = lv["output_throughput"] / baseline[lv["concurrency"]]
    direct = {lv["concurrency"]: lv for lv in levels if lv["target"] == "grpc"}
    for lv in levels:
        if lv["target"] == "router" and lv["concurrency"] in direct:
            d = direct[lv["concurrency"]]
            lv["router_overhead"] = {"ttft_p50_ms": (lv["ttft_s"]["p50"] - d["ttft_s"]["p50"]) * 1e3,
                                     "throughput_ratio": lv["output_throughput"] / d["output_throughput"]}
    print()
    print(markdown_table(levels))
    for lv in levels:
        if "router_overhead" in lv:
            o = lv["router_overhead"]
            what = f"{args.router_replicas} replicas through the router" if args.router_replicas else "router"
            print(f"{what} vs one replica over gRPC, C = {lv['concurrency']}: TTFT p50 {o['ttft_p50_ms']:+.2f} ms, "
                  f"throughput {o['throughput_ratio']:.3f}x")
    for lv in levels:
        if "stages_s" in lv and lv["concurrency"] in (min(args.concurrency), max(args.concurrency)):
            print()
            print(breakdown_table(lv))
            ok = abs(lv["stages_sum_over_e2e"] - 1) <= 0.10
            print(f"stages add up to E2E within 10%: {'yes' if ok else 'NO'} ({lv['stages_sum_over_e2e']:.3f})")
    print()
    print(cpu_table(levels))
    vs_peer = {target: peer_ratios(levels, target) for target in peers}
    for target, rows in vs_peer.items():
        if rows:
            print()
            print(peer_table(rows, target))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "load_average": os.getloadavg(), "input_len": args.input_len, "output_len": args.output_len,
                "request_rate": args.request_rate, "router_replicas": args.router_replicas,
                "command": " ".join(sys.argv)}
        meta["cpu_model"], meta["cpu_flags"] = cpu_model_and_flags()
        args.output.write_text(json.dumps({"meta": meta, "levels": levels, "vs_peer": vs_peer}, indent=2))
        print(f"\nwrote {args.output}")
    if args.plot:
        plot(levels, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

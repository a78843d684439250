#!/usr/bin/env python3
"""Soak: a mixed workload for a given time, sampling the server's memory, KV blocks and errors as it goes.

    .venv/bin/python scripts/soak.py --duration-s 1800 [--concurrency 12] [--model-dir build/smollm2]
        [--out build/soak/soak.json] [--plot build/soak/soak.png]

Starts its own tritonserver on free ports of 127.0.0.1 (or talks to ``--grpc-url``/``--http-url`` with
``--server-pid``), then ``--concurrency`` workers each loop over a random mix: short and long generations
over both protocols, streams with stop words, streams abandoned early (cancel), and bad requests that must
be refused with a 400-class error. Every ``--sample-s`` it records the resident memory of the server and its
backend stubs, the KV blocks in use and the requests running, and the counts of answers and errors.

Pass: RSS after the warm-up grows by less than ``--max-rss-growth-pct`` (default 5) and no unexpected error
(anything but the expected refusals of bad input, or "server busy" under overload). Exit code 0 on pass.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalellm.serving import TritonServer, free_ports  # noqa: E402
from scalellm_client import Client, ScaleLLMError, chatml  # noqa: E402

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Explain rain in one sentence.",
             "Write a haiku about the sea.", "What is 12 times 12?", "Tell me a long story about a dragon.",
             "Translate into French: good night", "List the planets of the solar system."]
BAD_REQUESTS = [  # each must be refused with a message, never served, never a server error
    {"max_tokens": -1}, {"max_tokens": 0}, {"max_tokens": 10**6}, {"temperature": -1.0}, {"top_p": 1.5},
    {"top_k": -5}, {"beam_width": 4}, {"min_tokens": 99, "max_tokens": 4},
]


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, error: str | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if kind == "unexpected_error" and error and len(self.unexpected) < 50:
                self.unexpected.append(error)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


def one_request(clients: dict[str, Client], rng: random.Random, tally: Tally) -> None:
    protocol = rng.choice(["grpc", "http"])
    client = clients[protocol]
    prompt = chatml(rng.choice(QUESTIONS))
    kind = rng.choices(["short", "long", "stop", "cancel", "bad"], weights=[35, 15, 20, 15, 15])[0]
    try:
        if kind == "bad":
            try:
                client.generate(prompt, **{"max_tokens": 8, **rng.choice(BAD_REQUESTS)})
            except ScaleLLMError as exc:
                refused = exc.status in (400, None) or "INVALID_ARG" in str(exc.status)
                tally.add("refused_bad_input" if refused else "unexpected_error", f"bad input got {exc.status}: {exc}")
                return
            tally.add("unexpected_error", "a bad request was served")
            return
        if kind == "cancel":
            stream = client.stream(prompt, max_tokens=256, end_id=0)
            for i, _ in enumerate(stream):
                if i >= rng.randint(1, 6):
                    break
            stream.close()  # the client cancels the request on the server
            tally.add("cancelled")
            return
        sampling: dict = {"max_tokens": rng.randint(1, 24) if kind == "short" else rng.randint(64, 192)}
        if kind == "long":
            sampling["end_id"] = 0  # run to max_tokens
        if kind == "stop":
            sampling.update(stop=[rng.choice([".", ",", " the", "\n"])], max_tokens=64)
        if rng.random() < 0.5:
            text = "".join(client.stream(prompt, **sampling))
        else:
            text = client.generate(prompt, **sampling).text
        tally.add("ok" if text is not None else "unexpected_error", "no text")
    except ScaleLLMError as exc:
        if "server busy" in str(exc):
            tally.add("busy")
        else:
            tally.add("unexpected_error", f"{kind}/{protocol}: {exc.status}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a soak records every failure instead of stopping
        tally.add("unexpected_error", f"{kind}/{protocol}: {type(exc).__name__}: {exc}")


def group_rss_mb(pgid: int) -> dict[str, float]:
    """Resident memory (MiB) of every process in the server's process group, by ``name:pid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        out[f"{name}:{entry.name}"] = rss_kb / 1024
    return out


def metrics(url: str) -> dict[str, float]:
    wanted = ("scalellm_kv_cache_blocks_used", "scalellm_requests_running", "scalellm_requests_waiting",
              "scalellm_requests_rejected_total")
    values = dict.fromkeys(wanted, 0.0)
    try:
        with NO_PROXY.open(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in values:
                    values[name] += float(line.rsplit(" ", 1)[1])
    except OSError:
        pass
    return values


def summarize(samples: list[dict], warmup_s: float, max_growth_pct: float, counts: dict[str, int]) -> dict:
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples
    base = after[0]["rss_mb"]
    tail = after[-max(1, len(after) // 10):]
    end = sum(s["rss_mb"] for s in tail) / len(tail)
    growth = 100.0 * (end - base) / base if base else 0.0
    unexpected = counts.get("unexpected_error", 0)
    return {"rss_mb_after_warmup": round(base, 1), "rss_mb_at_end": round(end, 1),
            "rss_growth_after_warmup_pct": round(growth, 2), "unexpected_errors": unexpected,
            "requests": sum(counts.values()), "counts": counts,
            "passed": growth < max_growth_pct and unexpected == 0}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples])
    axes[0].axvline(report["config"]["warmup_s"] / 60, color="grey", linestyle="--", label="end of warm-up")
    axes[0].set_ylabel("server RSS (MiB)\ntritonserver + stubs")
    axes[0].legend()
    axes[1].plot(t, [s["kv_blocks_used"] for s in samples], label="KV blocks used")
    axes[1].plot(t, [s["running"] for s in samples], label="requests running")
    axes[1].set_ylabel("engine")
    axes[1].legend()
    for kind in ("ok", "cancelled", "refused_bad_input", "busy", "unexpected_error"):
        axes[2].plot(t, [s["counts"].get(kind, 0) for s in samples], label=kind)
    axes[2].set_ylabel("requests (cumulative)")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    s = report["summary"]
    fig.suptitle(f"soak {report['config']['duration_s'] / 60:.0f} min, concurrency {report['config']['concurrency']}: "
                 f"RSS growth after warm-up {s['rss_growth_after_warmup_pct']:+.1f}%, "
                 f"{s['unexpected_errors']} unexpected errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--warmup-s", type=float, default=None, help="default: a fifth of the run, at most 300")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "build" / "smollm2")
    parser.add_argument("--grpc-url", help="use a running server (host:port) instead of starting one")
    parser.add_argument("--http-url", help="with --grpc-url: http://host:port")
    parser.add_argument("--metrics-url", help="with --grpc-url: http://host:port/metrics")
    parser.add_argument("--server-pid", type=int, help="with --grpc-url: the server's process group id")
    parser.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "soak" / "soak.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "build" / "soak" / "soak.png")
    args = parser.parse_args(argv)
    warmup_s = args.warmup_s if args.warmup_s is not None else min(300.0, args.duration_s / 5)

    server = None
    if args.grpc_url:
        grpc_url, http_url, metrics_url, pgid = args.grpc_url, args.http_url, args.metrics_url, args.server_pid
    else:
        http_port, grpc_port, metrics_port = free_ports(3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        server = TritonServer(args.model_dir / "model_repository", http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, log_file=args.out.with_suffix(".server.log"))
        server.start()
        server.wait_ready()
        grpc_url, http_url, metrics_url, pgid = server.grpc_url, server.http_url, server.metrics_url, server.pid
    tally, stop = Tally(), threading.Event()
    clients = {"grpc": Client(grpc_url, protocol="grpc", timeout_s=300),
               "http": Client(http_url, protocol="http", timeout_s=300)}

    def worker(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        while not stop.is_set():
            one_request(clients, rng, tally)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    samples = []
    try:
        while (elapsed := time.monotonic() - start) < args.duration_s:
            rss = group_rss_mb(pgid) if pgid else {}
            m = metrics(metrics_url) if metrics_url else {}
            samples.append({"t_s": round(elapsed, 1), "rss_mb": round(sum(rss.values()), 1), "rss_by_process": rss,
                            "kv_blocks_used": m.get("scalellm_kv_cache_blocks_used", 0),
                            "running": m.get("scalellm_requests_running", 0),
                            "waiting": m.get("scalellm_requests_waiting", 0), "counts": tally.snapshot()})
            print(f"[soak] {elapsed / 60:5.1f} min  RSS {samples[-1]['rss_mb']:8.1f} MiB  "
                  f"KV {samples[-1]['kv_blocks_used']:5.0f}  {samples[-1]['counts']}", flush=True)
            time.sleep(args.sample_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=330)
        for client in clients.values():
            client.close()
    idle = metrics(metrics_url) if metrics_url else {}
    for _ in range(60):  # the last cancels land within a step or two: give them time, then read the idle KV
        if not idle or idle["scalellm_kv_cache_blocks_used"] == 0:
            break
        time.sleep(0.5)
        idle = metrics(metrics_url)
    if server is not None:
        server.stop()
    counts = tally.snapshot()
    summary = summarize(samples, warmup_s, args.max_rss_growth_pct, counts)
    summary["kv_blocks_used_when_idle"] = idle.get("scalellm_kv_cache_blocks_used")
    summary["passed"] = summary["passed"] and not summary["kv_blocks_used_when_idle"]
    report = {
        "config": {"duration_s": args.duration_s, "warmup_s": warmup_s, "concurrency": args.concurrency,
                   "sample_s": args.sample_s, "seed": args.seed, "command": " ".join(sys.argv)},
        "summary": summary,
        "unexpected_error_examples": tally.unexpected,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if samples:
        plot(report, args.plot)
    print(json.dumps(report["summary"], indent=1))
    print(f"[soak] wrote {args.out} and {args.plot}")
    return 0 if report["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

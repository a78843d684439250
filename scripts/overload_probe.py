#!/usr/bin/env -S sh -c 'exec "$(dirname "$0")/../.venv/bin/python" "$0" "$@"'
"""Overload probe: many concurrent streaming chat requests through the router at once; does every request end
with an answer or a 429 + Retry-After, within the stated bounds, and is nothing left running in the engines?

    .venv/bin/python scripts/overload_probe.py                     # starts scripts/serve.sh --replicas 2 itself
    .venv/bin/python scripts/overload_probe.py --requests 400 --max-tokens 16 --prompt-words 110 \\
        --output build/overload-probe.json
    .venv/bin/python scripts/overload_probe.py --url http://127.0.0.1:9000 --model smollm2 \\
        --engine-metrics http://127.0.0.1:8002/metrics ...        # a router that is already running

Each request is ``/v1/chat/completions`` with ``stream: true``, ``max_tokens`` tokens (end of sequence ignored)
and a distinct prompt of ``--prompt-words`` common words (each one token for SmolLM2; with the chat template
about 140 tokens at the default), all sent at once with no client-side retries. Outcomes: ``completed`` (the
stream ended with [DONE] and an OpenAI finish reason), ``refused`` (429 with Retry-After), ``refused_without_
retry_after``, ``error`` (any other status or an error event), ``no_answer`` (nothing complete within
``--client-timeout``). The bounds checked: a refusal comes within the router's ``--queue-timeout`` (plus
``--slack-s``), an answer within its ``--request-timeout``; afterwards the engines' running and waiting
requests (their Prometheus gauges) are back to 0. Writes JSON; exit code 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalellm.router.config import ReplicaAddress, RouterConfig  # noqa: E402
from scalellm.router.launch import spawn  # noqa: E402
from scalellm.serving import free_ports  # noqa: E402

WORDS = "the of and to in is was for on that with as by at from his her they this which".split()
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ROUTER_DEFAULTS = RouterConfig(replicas=(ReplicaAddress("-", 0, 0),))


def prompt(index: int, words: int) -> str:
    head = f"Request {index}: continue this list."
    return head + " " + " ".join(WORDS[(index * 7 + i * 3) % len(WORDS)] for i in range(words))


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"n": len(values), "min": ordered[0], "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max": ordered[-1]}


async def one(session: aiohttp.ClientSession, url: str, model: str, index: int, args: argparse.Namespace) -> dict:
    body = {"model": model, "stream": True, "max_tokens": args.max_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt(index, args.prompt_words)}]}
    start = time.monotonic()
    result: dict = {"index": index}
    try:
        async with asyncio.timeout(args.client_timeout):
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                result["status"] = response.status
                result["headers_s"] = time.monotonic() - start
                if response.status != 200:
                    result["retry_after"] = response.headers.get("Retry-After")
                    result["body"] = (await response.text())[:300]
                    result["outcome"] = ("refused" if result["retry_after"] else "refused_without_retry_after") \
                        if response.status == 429 else "error"
                    return result
                finish, done, error = None, False, None
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"]
                    for choice in event.get("choices") or []:
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                        if "ttft_s" not in result and (choice.get("delta") or {}).get("content"):
                            result["ttft_s"] = time.monotonic() - start
                    if event.get("usage"):
                        result["prompt_tokens"] = event["usage"]["prompt_tokens"]
                        result["completion_tokens"] = event["usage"]["completion_tokens"]
                result["e2e_s"] = time.monotonic() - start
                result["finish_reason"] = finish
                if error is not None or not done or finish not in ("stop", "length"):
                    result["outcome"], result["body"] = "error", json.dumps(error)[:300]
                else:
                    result["outcome"] = "completed"
    except TimeoutError:
        result["outcome"] = "no_answer"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        result["outcome"], result["body"] = "error", repr(exc)[:300]
    return result


async def probe(url: str, model: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = time.monotonic()
        results = await asyncio.gather(*(one(session, url, model, i, args) for i in range(args.requests)))
        return list(results), time.monotonic() - start


def scrape(url: str) -> str:
    with NO_PROXY.open(url, timeout=10) as response:
        return response.read().decode()


def gauge_sum(text: str, family: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(family + "{") or line.startswith(family + " "))


def engines_busy(metrics_urls: list[str]) -> float:
    pages = [scrape(u) for u in metrics_urls]
    return sum(gauge_sum(p, "scalellm_requests_running") + gauge_sum(p, "scalellm_requests_waiting") for p in pages)


def wait_engines_idle(metrics_urls: list[str], timeout_s: float) -> float:
    """Requests running + waiting in every engine once they stop changing (0 when all are done)."""
    deadline = time.monotonic() + timeout_s
    busy = engines_busy(metrics_urls)
    while busy and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = engines_busy(metrics_urls)
    return busy


def router_flag(args: argparse.Namespace, flag: str, default: float) -> float:
    values = [args.router_args[i + 1] for i, a in enumerate(args.router_args[:-1]) if a == flag]
    return float(values[-1]) if values else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=110, help="about 140 prompt tokens with the template")
    parser.add_argument("--client-timeout", type=float, default=900.0, help="seconds before a client gives up")
    parser.add_argument("--slack-s", type=float, default=5.0, help="allowed beyond the router's queue timeout")
    parser.add_argument("--replicas", type=int, default=2, help="replicas the launcher starts")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "build" / "smollm2")
    parser.add_argument("--url", help="a running router (http://host:port) instead of starting one")
    parser.add_argument("--model", help="with --url: the served model name (default: the model dir's name)")
    parser.add_argument("--engine-metrics", nargs="*", default=[], help="with --url: the replicas' metrics URLs")
    parser.add_argument("--output", type=Path, default=ROOT / "build" / "overload-probe.json")
    parser.add_argument("router_args", nargs="*", help="after --: flags for the router (e.g. --queue-timeout 10)")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    queue_timeout = router_flag(args, "--queue-timeout", ROUTER_DEFAULTS.queue_timeout_s)
    request_timeout = router_flag(args, "--request-timeout", ROUTER_DEFAULTS.request_timeout_s)

    launcher = None
    if args.url:
        url, metrics_urls = args.url.rstrip("/"), list(args.engine_metrics)
    else:
        http_port, grpc_port = free_ports(2)
        launcher, metrics_urls = spawn(args.model_dir, args.replicas, http_port, grpc_port,
                                       args.output.parent / "overload-probe-logs", args.router_args)
        url = f"http://127.0.0.1:{http_port}"
    model = args.model or args.model_dir.resolve().name
    try:
        results, wall_s = asyncio.run(probe(url, model, args))
        left_busy = wait_engines_idle(metrics_urls, timeout_s=30.0) if metrics_urls else None
        router_metrics = scrape(f"{url}/metrics")
    finally:
        if launcher is not None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(180)

    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    refused = [r for r in results if r["outcome"] == "refused"]
    completed = [r for r in results if r["outcome"] == "completed"]
    refusal_s = [r["headers_s"] for r in refused]
    e2e_s = [r["e2e_s"] for r in completed]
    checks = {
        "every request completed or got 429 + Retry-After":
            outcomes.get("completed", 0) + outcomes.get("refused", 0) == len(results),
        f"every refusal within the queue timeout ({queue_timeout:g} s) + {args.slack_s:g} s":
            max(refusal_s, default=0.0) <= queue_timeout + args.slack_s,
        f"every answer within the request timeout ({request_timeout:g} s)": max(e2e_s, default=0.0) <= request_timeout,
        "nothing left running or waiting in the engines": left_busy == 0,
    }
    report = {
        "config": {"requests": args.requests, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
                   "replicas": None if args.url else args.replicas, "router_args": args.router_args,
                   "queue_timeout_s": queue_timeout, "request_timeout_s": request_timeout,
                   "client_timeout_s": args.client_timeout},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_after": os.getloadavg()},
        "wall_s": wall_s,
        "outcomes": outcomes,
        "completed_per_s": len(completed) / wall_s if wall_s else 0.0,
        "prompt_tokens": summary([r["prompt_tokens"] for r in completed if "prompt_tokens" in r]),
        "refusal_s": summary(refusal_s),
        "retry_after_s": summary([float(r["retry_after"]) for r in refused]),
        "ttft_s": summary([r["ttft_s"] for r in completed if "ttft_s" in r]),
        "e2e_s": summary(e2e_s),
        "engines_running_and_waiting_after": left_busy,
        "router": {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in router_metrics.splitlines()
                   if line.startswith(("scalellm_router_requests_rejected_total", "scalellm_router_queue_wait_seconds_"
                                       "count", "scalellm_router_queue_wait_seconds_sum",
                                       "scalellm_router_requests_refused_total"))},
        "errors": [r for r in results if r["outcome"] not in ("completed", "refused")][:10],
        "checks": checks,
        "passed": all(checks.values()),
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("outcomes", "refusal_s", "retry_after_s", "e2e_s",
                                             "engines_running_and_waiting_after", "checks", "passed")}, indent=2))
    print(f"wrote {args.output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``scalellm-client "prompt" [--stream] ...``: one request from the command line."""

from __future__ import annotations

import argparse
import sys

from ._types import ScaleLLMError
from .chat import SMOLLM2_SYSTEM, chatml
from .client import Client


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scalellm-client",
                                     description="Send one prompt to a ScaleLLM server and print the answer.")
    parser.add_argument("prompt")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", nargs="+", metavar="WORD", help="stop sequences")
    parser.add_argument("--chatml", action="store_true", help="wrap the prompt in SmolLM2's chat template")
    parser.add_argument("--system", help=f"system message with --chatml (default: {SMOLLM2_SYSTEM!r})")
    parser.add_argument("--timeout", type=float, help="seconds (default: no limit)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.system is not None and not args.chatml:
        print("scalellm-client: --system needs --chatml", file=sys.stderr)
        return 2
    prompt = chatml(args.prompt, args.system) if args.chatml else args.prompt
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed, "stop": args.stop}
    printed = False
    try:
        with Client(args.url, protocol=args.protocol, model=args.model, timeout_s=args.timeout) as client:
            if args.stream:
                for delta in client.stream(prompt, **sampling):
                    printed = True
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            else:
                sys.stdout.write(client.generate(prompt, **sampling).text)
    except ScaleLLMError as exc:
        if printed:
            sys.stdout.write("\n")
        print(f"scalellm-client: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

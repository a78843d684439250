"""``scalellm-client "prompt" [--chat] [--stream] ...``: one request from the command line."""

from __future__ import annotations

import argparse
import sys

from ._types import ScaleLLMError
from .chat import chatml
from .client import Client


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scalellm-client",
                                     description="Send one prompt to a ScaleLLM server and print the answer.")
    parser.add_argument("prompt")
    parser.add_argument("--chat", "--chatml", action="store_true",
                        help="ask the server to apply the model's chat template (a chat model needs it to answer)")
    parser.add_argument("--system", help="with --chat: format the prompt as ChatML here, with this system message")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default: %(default)s")
    parser.add_argument("--model", default="ensemble", help="default: %(default)s")
    parser.add_argument("--max-tokens", type=int, help="default: the server's (16 for our ensemble)")
    parser.add_argument("--temperature", type=float,
                        help="> 0 samples (with --top-p 1.0 unless --top-k/--top-p are given); default: greedy")
    parser.add_argument("--top-k", type=int, help="default: the server's (0: off)")
    parser.add_argument("--top-p", type=float, help="default: the server's (0: off)")
    parser.add_argument("--seed", type=int, help="default: random")
    parser.add_argument("--stop", nargs="+", metavar="WORD", help="stop sequences")
    parser.add_argument("-n", "--num-return-sequences", type=int,
                        help="completions to generate (default: 1; not with --stream)")
    parser.add_argument("--stream-interval", type=int, metavar="N",
                        help="with --stream: a response every N tokens after the first (default: the server's, 1)")
    parser.add_argument("--timeout", type=float, help="seconds (default: no limit)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.system is not None and not args.chat:
        print("scalellm-client: --system needs --chat", file=sys.stderr)
        return 2
    if args.stream and (args.num_return_sequences or 1) > 1:
        print("scalellm-client: --stream prints one sequence; drop --stream for -n > 1", file=sys.stderr)
        return 2
    prompt = args.prompt if args.system is None else chatml(args.prompt, args.system)
    sampling = {"max_tokens": args.max_tokens, "chat": args.chat and args.system is None,
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                "stop": args.stop, "num_return_sequences": args.num_return_sequences,
                "stream_interval": args.stream_interval}
    printed = False
    try:
        with Client(args.url, protocol=args.protocol, model=args.model, timeout_s=args.timeout) as client:
            if args.stream:
                for delta in client.stream(prompt, **sampling):
                    printed = True
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            else:
                texts = client.generate(prompt, **sampling).texts
                sys.stdout.write(texts[0] if len(texts) == 1 else "\n".join(f"[{i}] {t}" for i, t in enumerate(texts)))
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

"""`sophon-hf` command line: demo, protect, attack, push, verify.

Each sub-command lives in `sophon_hf/commands/<name>.py` with a `register(subparsers)` function; heavy
imports happen inside the command so that `sophon-hf --help` stays fast.
"""

import argparse
import sys

from .commands import attack, demo, protect, push, verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sophon-hf",
        description="Make Hugging Face models non-fine-tunable for a restricted domain (SOPHON) and measure it.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, protect, attack, push, verify):
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

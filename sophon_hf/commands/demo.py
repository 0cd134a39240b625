"""`sophon-hf demo`: pre-train, protect and attack a classifier offline on real MNIST digits."""

import argparse

from . import user_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo on real MNIST digits (pre-train, protect, attack, report)",
        description="Pre-trains a small Transformers classifier on MNIST digits 0-4, protects it with SOPHON against "
        "digits 5-9, then attacks the protected model, the unprotected original and a from-scratch model with real "
        "fine-tuning attacks. Everything is offline; 6-8 minutes on 2 CPU cores (--quick: about 1).",
    )
    parser.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument(
        "--quick", action="store_true", help="quick suite and shorter protection (1-1.5 minutes on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, models and attacks (default: 0)")
    parser.set_defaults(func=run, usage_error=parser.error)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.seed < 0:
        args.usage_error(f"--seed must be >= 0, got {args.seed}")
    with user_errors("demo"):  # e.g. an output folder of another run, or a file named like the folder
        run_demo(args.output, quick=args.quick, seed=args.seed)
    return 0

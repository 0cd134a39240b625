"""The demo's models against the six key attacks at long budgets (default 1000 steps, 10x a persistent attacker's 100).

Run `sophon-hf demo --output DIR` first (seed 0), then:

    python benchmarks/bench_long_budget.py --demo-output DIR [--steps 1000] [--with-adam-1e-2] [--json out.json]

`--with-adam-1e-2` adds the standard suite's Adam 1e-2 attacks with a fresh head and with LoRA (the strongest against
the demo's model once scratch is tuned, seventh session). Scratch follows the harness's default (tuned since then).

Prints, per attack, the final restricted accuracy of protected / unprotected / scratch (mean of 3 initialisations)
and the largest excess of the protected curve over scratch's at any evaluation point.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_ablation import KEY_ATTACKS  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

from sophon_hf import AttackSpec, evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.data import mnist_domains  # noqa: E402


def load_demo(demo_output: str, seed: int):
    """The demo's MNIST splits for `seed` and the attacker's images (as many as the demo in `demo_output` gave)."""
    with open(os.path.join(demo_output, "demo_settings.json")) as f:
        settings = json.load(f)
    data = mnist_domains(num_restricted_train=None, seed=seed)
    return data, data["restricted_train"].select(range(settings["attacker_images"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-output", required=True, help="folder written by `sophon-hf demo` (its seed: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--with-adam-1e-2", action="store_true", help="also fresh-head and LoRA Adam 1e-2")
    parser.add_argument("--json")
    args = parser.parse_args()
    data, attacker = load_demo(args.demo_output, args.seed)
    protected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "protected"))
    unprotected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "unprotected"))
    key = list(KEY_ATTACKS)
    if args.with_adam_1e_2:
        key += [
            AttackSpec(strategy=s, optimizer="adam", learning_rate=1e-2, steps=300)
            for s in ("full_reinit_head", "lora")
        ]
    attacks = [{**a.to_dict(), "steps": args.steps, "eval_interval": max(args.steps // 10, 1)} for a in key]
    report = evaluate_finetuning_resistance(
        protected, attacker, data["restricted_test"], attacks=attacks, reference_model=unprotected
    ).to_dict()
    for attack in report["attacks"]:
        excess = attack["largest_head_start"]["value"]  # the largest lead over scratch at any evaluation point
        final = attack["final"]
        print(
            f"{attack['name']:48s} protected {final['protected']:.3f}  unprotected {final['unprotected']:.3f}  "
            f"scratch {final['scratch']:.3f}  max excess over scratch {excess:+.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

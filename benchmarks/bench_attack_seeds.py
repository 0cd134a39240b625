"""How much one attack's verdict moves with the attack's own seed (data order, fresh head or adapters).

The demo and the 3-seed benchmark run every attack once per protection seed, so a single attack's "protected minus
scratch" mixes what the protection did with the luck of one fine-tuning run. This re-runs the attacks named on a
finished demo's models at several attack seeds (scratch tuned as in the harness, for each seed) and prints each
seed's final values and the mean and spread of protected minus scratch.

Run `sophon-hf demo --output DIR` (or `bench_demo_quality.py`) first, then:

    python benchmarks/bench_attack_seeds.py --demo-output DIR --seed 0 \
        --attacks full_reinit_head-adam-lr0.01 lora-adam-lr0.01 --attack-seeds 0 1 2 [--json out.json]

`NAME@LR` runs a recorded attack at another learning rate (e.g. `full_reinit_head-adam-lr0.01@0.03`), and
`--scratch-learning-rates` replaces the harness's grid for the tuned scratch baseline; with a grid wider than the
default, each line also gives scratch at its best rate within the default grid (to see what a wider grid changes).
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_long_budget import load_demo  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

from sophon_hf import evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.attacks import DEFAULT_SCRATCH_LEARNING_RATES as DEFAULT_RATES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-output", required=True, help="folder written by `sophon-hf demo` (its seed: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--attacks",
        nargs="+",
        required=True,
        help="attack names from the demo's report.json, NAME@LR for another learning rate",
    )
    parser.add_argument("--attack-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--scratch-learning-rates", type=float, nargs="+", help="scratch's Adam grid (default: the harness's)"
    )
    parser.add_argument("--json", help="write the report's dict (with summary.across_seeds) to this file")
    args = parser.parse_args()
    data, attacker = load_demo(args.demo_output, args.seed)
    with open(os.path.join(args.demo_output, "report.json")) as f:
        recorded = {attack["name"]: attack for attack in json.load(f)["attacks"]}
    specs = []
    for item in args.attacks:
        name, _, rate = item.partition("@")
        if name not in recorded:
            raise SystemExit(f"{name} is not in {args.demo_output}/report.json; choose from {sorted(recorded)}")
        spec = dict(recorded[name]["spec"])
        if rate:
            try:
                spec["learning_rate"] = float(rate)
            except ValueError:
                raise SystemExit(f"{item!r}: the learning rate after '@' must be a number, e.g. {name}@0.03") from None
        specs.append(spec)
    protected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "protected"))
    unprotected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "unprotected"))
    attacks = [{**spec, "seed": attack_seed} for spec in specs for attack_seed in args.attack_seeds]
    report = evaluate_finetuning_resistance(
        protected,
        attacker,
        data["restricted_test"],
        attacks=attacks,
        reference_model=unprotected,
        scratch_learning_rates=args.scratch_learning_rates,
    )
    for run in report.to_dict()["attacks"]:
        final = run["final"]
        within_default = [
            value for rate, value, _ in run["scratch_grid"] if any(math.isclose(rate, r) for r in DEFAULT_RATES)
        ]
        default_note = ""
        if len(within_default) < len(run["scratch_grid"]) and within_default:
            default_note = f", best of the default grid {max(within_default):.3f}"
        print(
            f"{run['name']:48s} protected {final['protected']:.3f}  unprotected {final['unprotected']:.3f}  "
            f"scratch {final['scratch']:.3f} (lr {run['scratch_learning_rate']:g}{default_note})  "
            f"protected - scratch {run['protected_minus_scratch']:+.3f}",
            flush=True,
        )
    for group in report.across_seeds():  # the harness's own grouping of runs that differ only in their seed
        print(
            f"{group['attack']:36s} protected - scratch: mean {group['mean']:+.3f}, min {group['min']:+.3f}, "
            f"max {group['max']:+.3f} over attack seeds {group['seeds']}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)


if __name__ == "__main__":
    main()

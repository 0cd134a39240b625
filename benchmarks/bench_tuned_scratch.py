"""How much of the demo's head start is a weak scratch baseline? The demo's attacks against a tuned scratch.

The harness's default scratch baseline trains the architecture from scratch with one recipe (Adam 1e-3). This
benchmark re-runs the attacks on the models of a `sophon-hf demo` output with a tuned scratch baseline
(`scratch_learning_rates`: Adam at 3e-4, 1e-3, 3e-3 and 1e-2, 3 initialisations each, the best rate per budget) and
prints, per attack, the protected and unprotected final accuracy against both baselines (the demo's budgets: its suite
at its `steps_scale`; the six key attacks at 300 steps). `--attacker-images` gives
the attacker the first N of the demo's attacker images (default: all of them, 50).

    OMP_NUM_THREADS=1 python benchmarks/bench_tuned_scratch.py --demo-output demo_output \\
        --json benchmarks/results/tuned_scratch_seed0_50.json
    OMP_NUM_THREADS=1 python benchmarks/bench_tuned_scratch.py --demo-output demo_output --attacker-images 20 \\
        --json benchmarks/results/tuned_scratch_seed0_20.json
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_ablation import KEY_ATTACKS  # noqa: E402
from bench_long_budget import load_demo  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

from sophon_hf import evaluate_finetuning_resistance  # noqa: E402

RATES = [3e-4, 1e-3, 3e-3, 1e-2]
FIXED = 1e-3  # the harness's default from-scratch recipe: Adam at 1e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-output", required=True, help="folder written by `sophon-hf demo` (its seed: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacker-images", type=int, default=None, help="the first N of the attacker's images")
    parser.add_argument("--attacks", default="standard", help="a suite name, or 'key' for the six key attacks")
    parser.add_argument("--json")
    args = parser.parse_args()
    data, attacker = load_demo(args.demo_output, args.seed)
    with open(os.path.join(args.demo_output, "demo_settings.json")) as f:
        steps_scale = json.load(f)["steps_scale"]  # the demo's budgets (the standard suite at half its steps)
    if args.attacker_images is not None:
        attacker = attacker.select(range(args.attacker_images))
    protected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "protected"))
    unprotected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "unprotected"))
    report = evaluate_finetuning_resistance(
        protected,
        attacker,
        data["restricted_test"],
        attacks=KEY_ATTACKS if args.attacks == "key" else args.attacks,
        reference_model=unprotected,
        scratch_learning_rates=RATES,
        steps_scale=1.0 if args.attacks == "key" else steps_scale,
        progress=True,
    ).to_dict()
    rows = []
    for attack in report["attacks"]:
        final, grid = attack["final"], dict(attack["scratch_grid"])
        rows.append(
            {
                "name": attack["name"],
                "protected": final["protected"],
                "unprotected": final["unprotected"],
                "scratch_fixed": grid[FIXED],
                "scratch_tuned": final["scratch"],
                "tuned_learning_rate": attack["scratch_learning_rate"],
            }
        )
        print(
            f"{attack['name']:40s} protected {final['protected']:.3f}  unprotected {final['unprotected']:.3f}  "
            f"scratch Adam 1e-3 {grid[FIXED]:.3f}  tuned {final['scratch']:.3f} (lr {attack['scratch_learning_rate']:g})"
        )
    n = len(rows)
    for baseline in ("scratch_fixed", "scratch_tuned"):
        below = sum(r["protected"] <= r[baseline] for r in rows)
        ahead = sum(r["unprotected"] > r[baseline] for r in rows)
        worst = max(rows, key=lambda r: r["protected"] - r[baseline])
        print(
            f"{baseline}: protected <= scratch in {below}/{n}; unprotected above scratch in {ahead}/{n}; worst "
            f"{worst['name']} {worst['protected'] - worst[baseline]:+.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"attacker_images": attacker.num_rows, "rates": RATES, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""How much of a head start is a weak scratch baseline? The demo's attacks against a fixed and a tuned scratch.

Until the seventh session the harness trained scratch with one recipe, Adam at 1e-3
(`scratch_recipe={"learning_rate": 1e-3}` still does). This benchmark re-runs the attacks on the models of a `sophon-hf demo` output with the tuned baseline
that is now the default (Adam at 1e-4, 1e-3 and 1e-2, 3 initialisations each, the best rate per budget) and prints,
per attack, the protected and unprotected final accuracy against both baselines (the 1e-3 entry of the grid is the
fixed recipe). Budgets: the demo's suite at its `steps_scale`, or the six key attacks at 300 steps.
`--attacker-images` gives the attacker the first N of the demo's attacker images (default: all of them).

    OMP_NUM_THREADS=1 python benchmarks/bench_tuned_scratch.py --demo-output demo_output \\
        --json benchmarks/results/tuned_scratch_seed0_50.json
    OMP_NUM_THREADS=1 python benchmarks/bench_tuned_scratch.py --demo-output demo_output --attacker-images 20 \\
        --json benchmarks/results/tuned_scratch_seed0_20.json
    OMP_NUM_THREADS=1 python benchmarks/bench_tuned_scratch.py --demo-output demo_output --scratch-sweep

`--scratch-sweep` only trains scratch (300 steps, 3 initialisations each) with other optimizers and rates too, and
prints the mean final accuracy of each recipe.
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

from sophon_hf import AttackSpec, evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.attacks import (  # noqa: E402
    DEFAULT_SCRATCH_LEARNING_RATES,
    SCRATCH_INIT_STRIDE,
    build_scratch_model,
    run_attack,
)
from sophon_hf.tasks import ClassificationTask  # noqa: E402

RATES = list(DEFAULT_SCRATCH_LEARNING_RATES)
FIXED = 1e-3  # the harness's default from-scratch recipe: Adam at 1e-3
SWEEP = [("adam", 3e-4), ("adam", 1e-3), ("adam", 3e-3), ("adam", 1e-2), ("sgd_momentum", 1e-2)]
SWEEP += [("sgd_momentum", 3e-2), ("sgd_momentum", 1e-1), ("rmsprop", 1e-3), ("adagrad", 1e-2)]


def scratch_sweep(model, attacker, test) -> dict[str, float]:
    """Mean final accuracy of scratch over 3 initialisations (the harness's seeds) for each recipe of `SWEEP`."""
    task = ClassificationTask(model)
    train, test = task.prepare_dataset(attacker, "train")[:], task.prepare_dataset(test, "test")
    out = {}
    for optimizer, lr in SWEEP:
        spec = AttackSpec(strategy="full", optimizer=optimizer, learning_rate=lr, steps=300)
        finals = [
            run_attack(build_scratch_model(model, seed=spec.seed + SCRATCH_INIT_STRIDE * k), task, train, test, spec)[
                "curve"
            ][-1][1]
            for k in range(3)
        ]
        out[f"{optimizer}:{lr:g}"] = sum(finals) / 3
        print(f"scratch {optimizer:13s} lr {lr:g}: {out[f'{optimizer}:{lr:g}']:.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-output", required=True, help="folder written by `sophon-hf demo` (its seed: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacker-images", type=int, default=None, help="the first N of the attacker's images")
    parser.add_argument("--attacks", default="standard", help="a suite name, or 'key' for the six key attacks")
    parser.add_argument("--scratch-sweep", action="store_true", help="only train scratch with the recipes of SWEEP")
    parser.add_argument("--json")
    args = parser.parse_args()
    data, attacker = load_demo(args.demo_output, args.seed)
    with open(os.path.join(args.demo_output, "demo_settings.json")) as f:
        steps_scale = json.load(f)["steps_scale"]  # the demo's budgets (the standard suite at half its steps)
    if args.attacker_images is not None:
        attacker = attacker.select(range(args.attacker_images))
    protected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "protected"))
    unprotected = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, "unprotected"))
    if args.scratch_sweep:
        sweep = scratch_sweep(unprotected, attacker, data["restricted_test"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"attacker_images": attacker.num_rows, "scratch": sweep}, f, indent=2)
        return
    report = evaluate_finetuning_resistance(
        protected,
        attacker,
        data["restricted_test"],
        attacks=KEY_ATTACKS if args.attacks == "key" else args.attacks,
        reference_model=unprotected,
        scratch_learning_rates=RATES,
        steps_scale=1.0 if args.attacks == "key" else steps_scale,
    ).to_dict()
    rows = []
    for attack in report["attacks"]:
        # `effective_final`: a diverged run counts with its best value before diverging, as in the report.
        final, grid = attack["effective_final"], {rate: value for rate, value, _ in attack["scratch_grid"]}
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

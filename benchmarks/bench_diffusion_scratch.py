"""A diffusion run of `bench_diffusion.py` against a tuned scratch baseline (Adam 1e-4, 1e-3, 1e-2, best per budget).

The runs of RESULTS_diffusion.md up to the sixth session compared with scratch trained at Adam 1e-3 alone. This re-runs a finished run's
attacks (its protected and unprotected UNets, its data and attacks) with the harness's default tuned baseline and
prints, per attack, the final denoising error of protected / unprotected / scratch and every rate's scratch error.

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_scratch.py --run P10 --json benchmarks/results/diffusion_tuned_scratch_P10.json
    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_scratch.py --run P10 --attacks adam:1e-3 --attack-seeds 3

`--attacks` replaces the run's attacks ("optimizer:lr,strategy/optimizer:lr,...", strategy `full` by default);
`--scratch-learning-rates` the scratch grid (the seventh to ninth sessions used the default; the runs since the tenth use `1e-3 1e-2`);
`--attack-seeds N` runs each at N seeds (the run's seed and the next ones) and prints the spread of the head start over
scratch per attack; `--lora-targets` sets the modules LoRA attacks adapt (the default, since the tenth session:
`to_q to_k to_v conv1 conv2`; the ninth session measured attention-only LoRA with this):

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_scratch.py --run P10 --attacks lora/adam:1e-3,lora/adam:1e-2 \
        --lora-targets to_q to_v
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_diffusion import attack_specs, load_run  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from sophon_hf.attacks import evaluate_finetuning_resistance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="an --output folder of bench_diffusion.py")
    parser.add_argument("--attacks", help="replace the run's attacks, e.g. adam:1e-3,lora/adam:1e-3")
    parser.add_argument("--attack-seeds", type=int, default=1, help="run every attack at this many seeds")
    parser.add_argument(
        "--lora-targets",
        nargs="+",
        help="module names LoRA attacks adapt (default: the harness's, to_q to_k to_v conv1 conv2)",
    )
    parser.add_argument(
        "--scratch-learning-rates",
        nargs="+",
        type=float,
        help="Adam rates for the tuned scratch baseline (default: the harness's, 1e-4 1e-3 1e-2)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    options, data = load_run(args.run)
    specs = attack_specs(
        args.attacks or options["attacks"], options["attack_steps"], options["batch_size"], options["seed"]
    )
    specs = [dataclasses.replace(spec, seed=spec.seed + k) for spec in specs for k in range(args.attack_seeds)]
    if args.lora_targets:
        if not any(spec.strategy == "lora" for spec in specs):
            raise SystemExit("--lora-targets needs a LoRA attack in --attacks, e.g. lora/adam:1e-3")
        specs = [
            dataclasses.replace(spec, lora_target_modules=args.lora_targets) if spec.strategy == "lora" else spec
            for spec in specs
        ]
    result = evaluate_finetuning_resistance(
        UNet2DModel.from_pretrained(os.path.join(args.run, "protected")),
        data["restricted_train"],
        data["restricted_test"],
        attacks=specs,
        reference_model=UNet2DModel.from_pretrained(os.path.join(args.run, "unprotected")),
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000),  # as bench_diffusion.py
        scratch_learning_rates=args.scratch_learning_rates,
    )
    report = result.to_dict()
    out = {}
    for attack in report["attacks"]:
        final = attack["effective_final"]
        out[attack["name"]] = {"final": final, "scratch_grid": attack["scratch_grid"]}
        grid = ", ".join(f"{rate:g}: {value:.4f}" for rate, value, _ in attack["scratch_grid"])
        print(
            f"{attack['name']:34s} protected {final['protected']:.4f}  unprotected {final['unprotected']:.4f}  "
            f"scratch {final['scratch']:.4f} (Adam {attack['scratch_learning_rate']:g}; {grid})"
        )
    for group in result.across_seeds():  # head start: scratch's error minus the protected UNet's (> 0: ahead)
        print(
            f"{group['attack']:34s} head start over scratch: mean {group['mean']:+.4f}, min {group['min']:+.4f}, "
            f"max {group['max']:+.4f} over seeds {group['seeds']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

"""A diffusion run of `bench_diffusion.py` against a tuned scratch baseline (Adam 1e-4, 1e-3, 1e-2, best per budget).

Every run in RESULTS_diffusion.md compared with scratch trained at Adam 1e-3 alone. This re-runs a finished run's
attacks (its protected and unprotected UNets, its data and attacks) with the harness's default tuned baseline and
prints, per attack, the final denoising error of protected / unprotected / scratch and every rate's scratch error.

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_scratch.py --run P10 --json benchmarks/results/diffusion_tuned_scratch_P10.json
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--json")
    args = parser.parse_args()
    options, data = load_run(args.run)
    report = evaluate_finetuning_resistance(
        UNet2DModel.from_pretrained(os.path.join(args.run, "protected")),
        data["restricted_train"],
        data["restricted_test"],
        attacks=attack_specs(options["attacks"], options["attack_steps"], options["batch_size"], options["seed"]),
        reference_model=UNet2DModel.from_pretrained(os.path.join(args.run, "unprotected")),
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000),  # as bench_diffusion.py
    ).to_dict()
    out = {}
    for attack in report["attacks"]:
        final = attack["effective_final"]
        out[attack["name"]] = {"final": final, "scratch_grid": attack["scratch_grid"]}
        grid = ", ".join(f"{rate:g}: {value:.4f}" for rate, value, _ in attack["scratch_grid"])
        print(
            f"{attack['name']:34s} protected {final['protected']:.4f}  unprotected {final['unprotected']:.4f}  "
            f"scratch {final['scratch']:.4f} (Adam {attack['scratch_learning_rate']:g}; {grid})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

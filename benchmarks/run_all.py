"""Run every benchmark and write the commands and their printed results into `benchmarks/RESULTS.md`.

    python benchmarks/run_all.py                  # everything (about 3 hours on 2 CPU cores)
    python benchmarks/run_all.py --skip-quality   # speed benchmarks and diffusion only
    python benchmarks/run_all.py --only bench_trainer.py

Each benchmark is a standalone script (see its docstring); this runner only calls them one after another, so that
they do not compete for the cores, and records what they printed. The record goes between the markers below in
RESULTS.md (appended at the end the first time), so the analysis written around it is kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = [
    ("bench_trainer.py", [], "Outer-iteration overhead and memory (issue: trainer foundation)"),
    ("bench_attacks.py", [], "Attack harness throughput and 2-process speed-up"),
    (
        "bench_diffusion.py",
        # Run V5 of RESULTS_diffusion.md, the shipped CPU recipe (trainers/configs/diffusion_photos_to_digits_cpu.yaml):
        # photo patches kept, digits denied, DoS at timesteps 0-300, persistent Adam 1e-2 attackers (full and LoRA).
        (
            "--output benchmarks/out/diffusion --threads 1 --seed 0 --attacker-images 50 "
            "--restricted-domain digits-after-photos --outer-iterations 300 --inner-steps 5 --strategies full,lora "
            "--inner-optimizers adam:1e-2 --simulation-horizon 50 --fts-lr 2.5e-3 --ntr-lr 1e-3 --ntr-steps 10 "
            "--timestep-range 0 300 --attack-steps 200 --scratch-learning-rates 1e-3 1e-2 "
            "--attacks adam:1e-3,adam:1e-2,lora/adam:1e-3,lora/adam:1e-2,sgd_momentum:1e-2"
        ).split(),
        "Diffusion: denial of service on a small UNet (photo patches kept, digits denied)",
    ),
    (
        "bench_diffusion_scale.py",
        ["--run", "benchmarks/out/diffusion"],
        "Diffusion: the same protected UNet with its grown weight scale undone (function unchanged)",
    ),
    (
        "bench_demo_quality.py",
        ["--seeds", "0", "1", "2", "--output", "benchmarks/out/demo_quality"],
        "Protection quality on the demo's setting, 3 seeds",
    ),
    (
        "bench_ablation.py",
        ["--variants", "authors", "sampled_features", "persistent", "demo", "--seeds", "0", "1", "2"],
        "Ablation of protection recipes on the demo's setting, 3 seeds, the six key attacks",
    ),
    ("bench_head_start.py", ["--seeds", "0", "1", "2"], "Where the attacker's head start lives"),
    (
        "bench_scale_trap.py",
        ["--demo-output", "benchmarks/out/demo_quality/seed0"],
        "A function-preserving weight-scale trap on the seed-0 demo's models",
    ),
    (
        "bench_tuned_scratch.py",
        ["--demo-output", "benchmarks/out/demo_quality/seed0"],
        "The seed-0 demo's attacks against scratch at Adam 1e-3 alone and at its best learning rate",
    ),
    (
        "bench_long_budget.py",
        ["--demo-output", "benchmarks/out/demo_quality/seed0", "--steps", "1000", "--with-adam-1e-2"],
        "The seed-0 demo's models at 1000 steps, 10x the simulated horizon",
    ),
    (
        "bench_attack_seeds.py",
        "--demo-output benchmarks/out/demo_quality/seed0 --seed 0 --attacks full_reinit_head-adam-lr0.01 "
        "full_reinit_head-sgd_momentum-lr0.01 full-adam-lr0.01 lora-adam-lr0.01 --attack-seeds 0 1 2".split(),
        "The seed-0 demo's strongest attacks at three attack seeds",
    ),
    ("bench_normalization.py", ["--seeds", "0"], "The demo's ResNet with batch, layer or no normalisation"),
    (
        "bench_diffusion_scratch.py",
        "--run benchmarks/out/diffusion --attacks adam:1e-3,adam:1e-2,lora/adam:1e-2 --attack-seeds 3 "
        "--scratch-learning-rates 1e-3 1e-2".split(),
        "Diffusion: the protected UNet's three Adam attacks at three attack seeds, against a tuned scratch baseline",
    ),
]
QUALITY = {
    "bench_demo_quality.py",
    "bench_ablation.py",
    "bench_head_start.py",
    "bench_scale_trap.py",
    "bench_tuned_scratch.py",
    "bench_long_budget.py",
    "bench_attack_seeds.py",
    "bench_normalization.py",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--only", nargs="+")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()
    sections = []
    for script, extra, title in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        if args.skip_quality and script in QUALITY:
            continue
        command = [sys.executable, os.path.join("benchmarks", script), *extra]
        printable = " ".join(["python", os.path.join("benchmarks", script), *extra])
        print(f"== {printable}", flush=True)
        out = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(HERE))
        text = "\n".join(line for line in out.stdout.splitlines() if "Warning" not in line)
        print(text, flush=True)
        status = "" if out.returncode == 0 else f"\n(exit code {out.returncode}; stderr tail)\n{out.stderr[-2000:]}"
        sections.append(f"## {title}\n\nCommand: `{printable}`\n\n```\n{text.strip()[-6000:]}{status}\n```\n")
    header = (
        "# Latest `run_all.py` record\n\n"
        f"Written by `python benchmarks/run_all.py` on {datetime.date.today()}: {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}.\n\n"
    )
    write_record(args.results, header + "\n".join(sections))


BEGIN, END = "<!-- run_all.py: begin -->", "<!-- run_all.py: end -->"


def write_record(path: str, record: str) -> None:
    """Put `record` between the run_all markers of `path`, keeping everything outside them."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{BEGIN}\n{record.strip()}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()

"""Overhead of SOPHON's meta machinery: one outer iteration vs the same plain forward+backward passes.

An outer iteration with K inner steps runs 2K forward+backward passes on half restricted batches (support: the
simulated attacker's step; query: the suppression loss) plus one NTR pass on a full original batch. The baseline
runs exactly those passes directly on the module (`loss.backward()` and an in-place SGD update), so the ratio is
what the functional simulation, fresh heads, buffer copies, the meta-gradient bookkeeping and the two Adam steps
add. Memory: the peak resident-set increase of one outer iteration over that of one plain training step, each
measured in a fresh subprocess from the state right after loading the model and data, so that it counts what the
step allocates: activations, gradients, optimizer states, and for SOPHON the fast weights and meta-gradients
(Linux: VmHWM after resetting it through /proc/self/clear_refs).

    python benchmarks/bench_trainer.py            # prints a table and ratios
    python benchmarks/bench_trainer.py --json out.json
    python benchmarks/bench_trainer.py --models unet   # only some models' rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

MODELS = ("resnet", "vit", "unet")
STRATEGIES = {
    "resnet": ("full", "full_reinit_head", "linear_probe", "lora"),
    "vit": ("full", "full_reinit_head", "linear_probe", "lora"),
    "unet": ("full", "lora"),  # a denoiser has no head
}
K, BATCH = 10, 32


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "resnet":
        from sophon_hf.demo import demo_model

        return demo_model()
    if kind == "unet":  # the diffusion benchmark's 177k-parameter UNet, 16x16 grayscale
        from bench_diffusion import build_unet

        return build_unet(16, seed=0)
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=5,
    )
    return ViTForImageClassification(config)


def _setup(kind: str, strategy: str):
    from datasets import Dataset

    from sophon_hf import SophonConfig, SophonTrainer

    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        from diffusers import DDPMScheduler

        data = lambda n: Dataset.from_dict({"pixel_values": (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).numpy()})  # noqa: E731
        extra = {"restricted_loss": "denial_of_service"}
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    else:
        data = lambda n: Dataset.from_dict(  # noqa: E731
            {
                "pixel_values": torch.rand(n, 1, 28, 28, generator=g).numpy(),
                "labels": torch.randint(5, (n,), generator=g),
            }
        )
        extra, scheduler = {}, None
    model = _model(kind)
    args = SophonConfig(
        output_dir="/tmp/sophon-bench",
        max_steps=1,
        per_device_train_batch_size=BATCH,
        inner_steps=K,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        simulation_strategies=[strategy],
        inner_optimizers=["sgd"],
        **extra,
    )
    trainer = SophonTrainer(
        model, args=args, train_dataset=data(256), restricted_dataset=data(256), noise_scheduler=scheduler
    )
    trainer.create_optimizer()
    batch = {k: v for k, v in trainer.train_dataset.with_format("torch")[:BATCH].items()}
    return trainer, model, batch


def outer_iteration(trainer, model, batch):
    trainer.training_step(model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.state.global_step += 1


def plain_passes(trainer, model, batch):
    """The same passes as an outer iteration, done directly: 2K half-batch passes and one full-batch pass."""
    half = {k: v[: BATCH // 2] for k, v in batch.items()}
    for _ in range(2 * K):
        loss, _ = trainer.task.loss(model, half)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(1e-4 * p.grad)
                p.grad = None
    loss, _ = trainer.task.loss(model, batch)
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()


def plain_step(trainer, model, batch):
    loss, _ = trainer.task.loss(model, batch)
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()


def time_ratio(kind: str, strategy: str, repeats: int = 7) -> dict:
    trainer, model, batch = _setup(kind, strategy)
    for fn in (outer_iteration, plain_passes):  # warm-up
        fn(trainer, model, batch)
    outer, plain = [], []
    for _ in range(repeats):  # interleaved: the machine's noise hits both alike
        t = time.perf_counter()
        outer_iteration(trainer, model, batch)
        outer.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain_passes(trainer, model, batch)
        plain.append(time.perf_counter() - t)
    o, p = statistics.median(outer), statistics.median(plain)
    return {"model": kind, "strategy": strategy, "outer_s": o, "plain_s": p, "time_ratio": o / p}


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def memory_child(kind: str, what: str) -> int:
    """Peak resident memory one step needs on top of the loaded model and data (its optimizer states included)."""
    trainer, model, batch = _setup(kind, "full")
    fn = outer_iteration if what == "outer" else plain_step
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib()
    fn(trainer, model, batch)
    return _peak_kib() - before


def memory_ratio(kind: str) -> dict:
    def run(what):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", kind, what], capture_output=True, text=True, check=True
        )
        return max(int(out.stdout.strip().splitlines()[-1]), 1)

    outer, plain = run("outer"), run("plain")
    return {"model": kind, "outer_peak_kib": outer, "plain_peak_kib": plain, "memory_ratio": outer / plain}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--memory-child", nargs=2)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    if args.memory_child:
        print(memory_child(*args.memory_child))
        return
    results = {"time": [], "memory": []}
    print(f"Outer iteration (K={K}, batch {BATCH}) vs the same plain forward+backward passes (target <= 1.3)")
    for kind in args.models:
        for strategy in STRATEGIES[kind]:
            r = time_ratio(kind, strategy)
            results["time"].append(r)
            print(
                f"  {kind:6s} {strategy:17s} outer {r['outer_s'] * 1e3:7.1f} ms  plain {r['plain_s'] * 1e3:7.1f} ms  "
                f"ratio {r['time_ratio']:.2f}"
            )
    print("Peak memory of a first-order outer iteration vs a plain training step (target <= 2)")
    for kind in args.models:
        r = memory_ratio(kind)
        results["memory"].append(r)
        print(
            f"  {kind:6s} outer +{r['outer_peak_kib']} KiB  plain +{r['plain_peak_kib']} KiB  "
            f"ratio {r['memory_ratio']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

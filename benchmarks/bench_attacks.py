"""Attack harness throughput: harness vs a bare PyTorch loop, and 1 vs 2 processes.

1. Steps/s of `run_attack` (the loop behind `evaluate_finetuning_resistance`) against a bare PyTorch loop on the
   same model, batch size, optimizer and data (target: ratio >= 0.8).
2. Wall time of `evaluate_finetuning_resistance` on a set of attacks in one process vs two processes launched with
   `accelerate launch --multi_gpu --num_processes 2` (CPU: gloo ranks), each process timing only the attacks.

Usage:
    python benchmarks/bench_attacks.py                 # both measurements
    python benchmarks/bench_attacks.py --skip-processes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import Dataset

from sophon_hf.attacks import AttackSpec, evaluate_finetuning_resistance, run_attack, scratch_spec
from sophon_hf.tasks import get_task


class CNN(nn.Module):
    """A ~100k-parameter MNIST-size CNN (the size of the project's first re-implementation of the authors' recipe) (28x28 grayscale, 5 classes)."""

    def __init__(self, num_labels: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, num_labels)

    def forward(self, pixel_values):
        return self.head(self.body(pixel_values))


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=5,
    )
    return ViTForImageClassification(config)


def dataset(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, (n,), generator=g)
    pixels = torch.rand(n, 1, 28, 28, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) / 5
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()})


def bare_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int) -> float:
    """Plain PyTorch: Adam, shuffled index batches, cross-entropy. Returns steps/s."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    is_hf = hasattr(model, "config")
    generator = torch.Generator().manual_seed(0)
    order, position = torch.randperm(len(y), generator=generator), 0
    began = time.perf_counter()
    for _ in range(steps):
        if position >= len(y):
            order, position = torch.randperm(len(y), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        optimizer.zero_grad(set_to_none=True)
        out = model(pixel_values=x[index]).logits if is_hf else model(x[index])
        F.cross_entropy(out, y[index]).backward()
        optimizer.step()
    return steps / (time.perf_counter() - began)


def harness_loop(model: nn.Module, train: Dataset, test: Dataset, steps: int, batch_size: int) -> float:
    """`run_attack` with Adam, evaluating only at step 0 and at the end (on a small test set). Returns steps/s."""
    task = get_task(model)
    columns = task.prepare_dataset(train, "train")[:]
    test = task.prepare_dataset(test, "test")
    spec = AttackSpec(optimizer="adam", learning_rate=1e-3, steps=steps, batch_size=batch_size, eval_interval=steps)
    began = time.perf_counter()
    run_attack(model, task, columns, test, spec)
    return steps / (time.perf_counter() - began)


def compare_loops(steps: int, batch_size: int, repeats: int) -> list[dict]:
    results = []
    train, test = dataset(512, 0), dataset(64, 1)
    x, y = torch.tensor(train["pixel_values"]), torch.tensor(train["labels"])
    for name, make in (("cnn_102k", CNN), ("vit_h64_l4", tiny_vit)):
        torch.manual_seed(0)
        model = make()
        bare_loop(model, x, y, 10, batch_size)  # warm-up: allocator, kernels
        harness_loop(model, train, test, 10, batch_size)
        bare, harness = [], []
        for _ in range(repeats):  # interleaved so load changes on a shared machine hit both alike
            bare.append(bare_loop(model, x, y, steps, batch_size))
            harness.append(harness_loop(model, train, test, steps, batch_size))
        bare_best, harness_best = max(bare), max(harness)
        results.append(
            {
                "model": name,
                "batch_size": batch_size,
                "steps": steps,
                "bare_steps_per_s": round(bare_best, 1),
                "harness_steps_per_s": round(harness_best, 1),
                "ratio": round(harness_best / bare_best, 3),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


PROCESS_ATTACKS = [
    AttackSpec(strategy=strategy, optimizer=optimizer, learning_rate=lr, steps=100, batch_size=32)
    for strategy, optimizer, lr in (
        ("full", "adam", 1e-3),
        ("full", "sgd_momentum", 1e-2),
        ("full_reinit_head", "adam", 1e-3),
        ("full_reinit_head", "rmsprop", 1e-3),
        ("linear_probe", "adam", 1e-2),
        ("lora", "adam", 1e-3),
    )
]


def worker(result_path: str) -> None:
    """Run the process benchmark's attacks (in 1 process, or as one rank of `accelerate launch`)."""
    torch.manual_seed(0)
    model = CNN()
    train, test = dataset(512, 0), dataset(256, 1)
    began = time.perf_counter()
    # One scratch run shared by every attack (one initialisation, one rate), the workload of RESULTS.md section 2.
    evaluate_finetuning_resistance(
        model, train, test, PROCESS_ATTACKS, scratch_inits=1, scratch_recipe={"learning_rate": 1e-3}
    )
    seconds = time.perf_counter() - began
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_path, "w") as f:
            json.dump({"seconds": seconds, "threads": torch.get_num_threads()}, f)


def compare_processes() -> dict:
    """1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread (gloo ranks), same attacks."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: os.path.join(tmp, f"{key}.json") for key in ("one", "one_2threads", "two")}
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, __file__, "--worker", paths["one"]], check=True, env=one_thread)
        two_threads = {**os.environ, "OMP_NUM_THREADS": "2"}
        subprocess.run([sys.executable, __file__, "--worker", paths["one_2threads"]], check=True, env=two_threads)
        launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        launch += ["--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--worker", paths["two"]]
        subprocess.run(launch, check=True, env={**one_thread, "ACCELERATE_USE_CPU": "1"})
        times = {}
        for key, path in paths.items():
            with open(path) as f:
                times[key] = json.load(f)
    single, double = times["one"], times["two"]
    result = {
        "attacks": len(PROCESS_ATTACKS),
        # One run per attack plus one scratch run: all attacks share budget, batch size and seed.
        "runs": len(PROCESS_ATTACKS)
        + len({scratch_spec(spec, {"learning_rate": 1e-3}).name for spec in PROCESS_ATTACKS}),
        "one_process_1_thread_s": round(single["seconds"], 2),
        "one_process_2_threads_s": round(times["one_2threads"]["seconds"], 2),
        "two_processes_1_thread_each_s": round(double["seconds"], 2),
        "speedup_vs_1_thread": round(single["seconds"] / double["seconds"], 2),
        "speedup_vs_2_threads": round(times["one_2threads"]["seconds"] / double["seconds"], 2),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for the loop comparison")
    parser.add_argument("--skip-processes", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    # One thread by default: on a shared 2-core machine OpenMP spinning makes multi-threaded timings mostly noise.
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    compare_loops(args.steps, args.batch_size, args.repeats)
    if not args.skip_processes:
        compare_processes()


if __name__ == "__main__":
    main()

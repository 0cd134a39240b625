"""A function-preserving reparametrisation against the six key attacks: why standard-suite numbers can be gamed.

Every convolution of the demo's ResNet is followed by a BatchNorm, so multiplying a convolution's weights by `c` (and
the BatchNorm's running statistics accordingly) leaves the network's function unchanged; so does multiplying every
BatchNorm's affine parameters by `k` (ReLU is positively homogeneous and the residual sums stay consistent) while
dividing the classifier's weights by `k`. The reparametrised model predicts exactly what the original predicts, but
every optimizer's steps become tiny relative to the weights (Dinh et al. 2017, "Sharp Minima Can Generalize For Deep
Nets", use the same symmetry), so fine-tuning barely moves the body and every attack degenerates into training the
head. Nothing is removed: an attacker who divides the scales back gets the model without the trap.

Run `sophon-hf demo --output DIR` first (seed 0), then:

    python benchmarks/bench_scale_trap.py --demo-output DIR [--conv-scale 100] [--affine-scale 100] [--json out.json]

Prints, for the protected and for the unprotected model with the trap, the original accuracy before and after the
reparametrisation and the six key attacks' final restricted accuracy against scratch (mean of 3 initialisations).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from bench_ablation import KEY_ATTACKS  # noqa: E402
from bench_long_budget import load_demo  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

from sophon_hf import evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.tasks import ClassificationTask  # noqa: E402


@torch.no_grad()
def reparametrise(model, conv_scale: float, affine_scale: float) -> int:
    """Scale a Transformers ResNet's weights without changing its function; returns the number of conv+BN pairs."""
    pairs = [
        (m.convolution, m.normalization)
        for m in model.modules()
        if isinstance(getattr(m, "convolution", None), torch.nn.Conv2d)
        and isinstance(getattr(m, "normalization", None), torch.nn.BatchNorm2d)
    ]
    for i, (conv, norm) in enumerate(pairs):
        # Every convolution but the stem's reads activations that the scaled affine parameters made `k` times larger.
        input_scale = conv_scale * (1.0 if i == 0 else affine_scale)
        conv.weight.mul_(conv_scale)
        norm.running_mean.mul_(input_scale)
        norm.running_var.mul_(input_scale**2)
        norm.weight.mul_(affine_scale)
        norm.bias.mul_(affine_scale)
    model.classifier[-1].weight.div_(affine_scale)
    return len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-output", required=True, help="folder written by `sophon-hf demo` (its seed: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conv-scale", type=float, default=100.0)
    parser.add_argument("--affine-scale", type=float, default=100.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    data, attacker = load_demo(args.demo_output, args.seed)
    results = {}
    for which in ("protected", "unprotected"):
        model = AutoModelForImageClassification.from_pretrained(os.path.join(args.demo_output, which))
        task = ClassificationTask(model)
        original_test = task.prepare_dataset(data["original_test"])
        before = task.evaluate(model, original_test)
        pairs = reparametrise(model, args.conv_scale, args.affine_scale)
        after = task.evaluate(model, original_test)
        print(f"\n{which} with the trap ({pairs} conv+BN pairs scaled): original accuracy {before:.3f} -> {after:.3f}")
        report = evaluate_finetuning_resistance(model, attacker, data["restricted_test"], attacks=KEY_ATTACKS)
        report = report.to_dict()
        for attack in report["attacks"]:
            final = attack["final"]
            print(f"  {attack['name']:40s} {which} + trap {final['protected']:.3f}  scratch {final['scratch']:.3f}")
        results[which] = {"original_before": before, "original_after": after, "report": report}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()

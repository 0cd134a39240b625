"""Does the fresh-head head start depend on BatchNorm? The demo's recipe on the same ResNet with other normalisations.

In training mode a BatchNorm layer normalises every channel with the statistics of the attacker's own batch, so it
re-scales and re-centres whatever the protection did to a channel's response on restricted data: a per-domain adapter
that every attacker gets for free. This benchmark builds a plain-PyTorch copy of the demo's ResNet (the same stem,
bottleneck stages, widths and head; `sophon_hf.demo.demo_model`) with one of three normalisations after every
convolution, and runs `bench_ablation.py`'s pipeline on it (pre-training on digits 0-4, the demo's protection recipe,
the six key attacks with 50 attacker images; scratch = the same plain module re-initialised, mean of 3 inits):

- `batch`: BatchNorm2d, as the demo's Transformers ResNet (the control: it should behave like the demo);
- `layer`: GroupNorm with one group (normalises each example over all channels and positions; no batch statistics,
  nothing per channel);
- `none`: no normalisation (convolutions with a bias).

    OMP_NUM_THREADS=1 python benchmarks/bench_normalization.py --norms batch layer none --seeds 0 \\
        --json benchmarks/results/normalization_seed0.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from bench_ablation import KEY_ATTACKS, print_finals, run
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class ConvNormAct(nn.Sequential):
    def __init__(self, norm: str, cin: int, cout: int, kernel: int, stride: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=norm == "none"),
            _norm(norm, cout),
            nn.ReLU() if act else nn.Identity(),
        )


class Bottleneck(nn.Module):
    def __init__(self, norm: str, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.layer = nn.Sequential(
            ConvNormAct(norm, cin, mid, 1),
            ConvNormAct(norm, mid, mid, 3, stride),
            ConvNormAct(norm, mid, cout, 1, act=False),
        )
        self.shortcut = (
            nn.Identity() if cin == cout and stride == 1 else ConvNormAct(norm, cin, cout, 1, stride, act=False)
        )

    def forward(self, x):
        return torch.relu(self.layer(x) + self.shortcut(x))


class PlainResNet(nn.Module):
    """`demo_model()`'s architecture in plain PyTorch with a choice of normalisation; forward(pixel_values) -> logits."""

    def __init__(self, norm: str = "batch", num_labels: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(norm, 1, 16, 7, 2),
            nn.MaxPool2d(3, 2, 1),
            Bottleneck(norm, 16, 16, 1),
            Bottleneck(norm, 16, 32, 2),
            Bottleneck(norm, 32, 64, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_labels)

    def forward(self, pixel_values):
        return self.classifier(self.body(pixel_values))


def make_model(seed: int, norm: str) -> PlainResNet:
    torch.manual_seed(seed)
    return PlainResNet(norm)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--norms", nargs="+", default=["batch", "layer", "none"], choices=["batch", "layer", "none"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", default="demo", help="a bench_ablation.py variant (default: the demo's recipe)")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for norm in args.norms:
        for seed in args.seeds:
            r = run(args.variant, seed, KEY_ATTACKS, make_model=functools.partial(make_model, norm=norm))
            r["norm"] = norm
            results.append(r)
            print(
                f"\nnorm {norm} seed {seed}: original {r['original']['unprotected']:.3f} -> "
                f"{r['original']['protected']:.3f}, protection {r['protection_seconds']:.0f} s",
                flush=True,
            )
            print_finals(r["final"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

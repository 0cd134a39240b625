"""Where does the attacker's head start live? Transplant the first layers of the unprotected demo model into a fresh one.

On the demo's setting (ResNet pre-trained on MNIST 0-4, attacker with 50 labelled images of 5-9, 300 steps), the
model that keeps the first k blocks of the unprotected weights and re-initialises everything after them is attacked
with the fresh-head attacks that no protection recipe stops. If keeping only the stem (the first convolution and its
BatchNorm) already gives most of the unprotected model's head start, then the head start is carried by generic
stroke detectors that the original task needs just as much, and no suppression objective can remove it without
costing original accuracy.

    python benchmarks/bench_head_start.py                 # seed 0
    python benchmarks/bench_head_start.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_ablation import pretrain  # noqa: E402

from sophon_hf import AttackSpec, evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.data import mnist_domains  # noqa: E402
from sophon_hf.demo import demo_model  # noqa: E402

ATTACKS = [
    AttackSpec(strategy="full_reinit_head", optimizer="adam", learning_rate=1e-3, steps=300),
    AttackSpec(strategy="full_reinit_head", optimizer="rmsprop", learning_rate=1e-3, steps=300),
]
# Blocks of the demo's Transformers ResNet, in forward order.
BLOCKS = ["resnet.embedder", "resnet.encoder.stages.0", "resnet.encoder.stages.1", "resnet.encoder.stages.2"]


def transplant(pretrained, fresh, keep: int):
    """`fresh` with the first `keep` blocks (parameters and BatchNorm statistics) taken from `pretrained`."""
    state, source = fresh.state_dict(), pretrained.state_dict()
    for key in state:
        if any(key.startswith(f"{block}.") for block in BLOCKS[:keep]):
            state[key] = source[key]
    fresh.load_state_dict(state)
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    for seed in args.seeds:
        data = mnist_domains(num_restricted_train=None, seed=seed)
        attacker = data["restricted_train"].select(range(50))
        unprotected = pretrain(demo_model(seed), data["original_train"], seed=seed)
        # keep=0 is a fresh model (a second scratch init); keep=4 is the unprotected body with a fresh head.
        for keep in range(len(BLOCKS) + 1):
            model = transplant(unprotected, demo_model(seed + 1000), keep)
            report = evaluate_finetuning_resistance(
                model, attacker, data["restricted_test"], attacks=ATTACKS, include_scratch=keep == 0
            ).to_dict()
            kept = "nothing (fresh init)" if keep == 0 else f"up to {BLOCKS[keep - 1]}"
            finals = "  ".join(f"{a['name']} {a['final']['protected']:.3f}" for a in report["attacks"])
            if keep == 0:
                finals += f"  (scratch recipe: {report['attacks'][0]['final']['scratch']:.3f})"
            print(f"seed {seed} keep {kept:34s} {finals}", flush=True)


if __name__ == "__main__":
    main()

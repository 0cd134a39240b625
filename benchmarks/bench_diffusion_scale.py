"""How much of a protected UNet's resistance is weight scale? Undo the growth, keep the function, attack again.

In a Diffusers `ResnetBlock2D`, `conv1` (plus the time-embedding projection added to its output) feeds a GroupNorm:
multiplying `conv1`'s weight and bias and `time_emb_proj`'s weight and bias by the same factor leaves the UNet's
function unchanged. Denial-of-service protection makes these weights 4-6x larger than at initialisation (the
unprotected UNet's stay within 1.4x, `sophon_hf.attacks.audit_weight_scale`), which shrinks every optimizer's steps
relative to them. This script rescales each block back to the unprotected UNet's scale and runs the same attacks as
`bench_diffusion.py` on the protected UNet as it is and rescaled.

    python benchmarks/bench_diffusion.py --output P10 ...       # first: a protection run (see RESULTS_diffusion.md)
    python benchmarks/bench_diffusion_scale.py --run P10 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from bench_diffusion import attack_specs, load_run  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from sophon_hf.attacks import evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.diffusion import DiffusionTask  # noqa: E402


def _rms(tensor: torch.Tensor) -> float:
    return tensor.detach().float().pow(2).mean().sqrt().item()


@torch.no_grad()
def rescale_like(protected: UNet2DModel, reference: UNet2DModel) -> dict[str, float]:
    """Give every ResnetBlock2D's `conv1` of `protected` the weight RMS of `reference`'s, keeping the function."""
    factors = {}
    references = dict(reference.named_modules())
    for name, block in protected.named_modules():
        if not isinstance(block, ResnetBlock2D):
            continue
        if block.time_embedding_norm != "default":
            raise ValueError(f"{name}: only additive time embeddings keep the rescaled block's function")
        factor = _rms(references[name].conv1.weight) / _rms(block.conv1.weight)
        for layer in (block.conv1, block.time_emb_proj):
            if layer is not None:
                layer.weight.mul_(factor)
                if layer.bias is not None:
                    layer.bias.mul_(factor)
        factors[name] = factor
    return factors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="output folder of bench_diffusion.py (protected/, unprotected/)")
    parser.add_argument("--attacks", default="adam:1e-4,adam:1e-3,sgd_momentum:1e-2")
    parser.add_argument("--attack-steps", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    run_args, data = load_run(args.run)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unprotected = UNet2DModel.from_pretrained(os.path.join(args.run, "unprotected"))
    protected = UNet2DModel.from_pretrained(os.path.join(args.run, "protected"))
    rescaled = UNet2DModel.from_pretrained(os.path.join(args.run, "protected"))
    factors = rescale_like(rescaled, unprotected)
    task = DiffusionTask(unprotected, scheduler)
    test = {split: task.prepare_dataset(data[split], split) for split in ("original_test", "restricted_test")}
    before = {
        name: {split: task.evaluate(model, rows) for split, rows in test.items()}
        for name, model in (("protected", protected), ("rescaled", rescaled), ("unprotected", unprotected))
    }
    print(f"rescaling factors: {min(factors.values()):.3f}-{max(factors.values()):.3f}")
    print("before any attack (denoising error):", json.dumps(before, indent=1))
    specs = attack_specs(args.attacks, args.attack_steps, run_args["batch_size"], run_args["seed"])
    finals = {}
    for name, model in (("protected", protected), ("rescaled", rescaled)):
        report = evaluate_finetuning_resistance(
            model,
            data["restricted_train"],
            data["restricted_test"],
            attacks=specs,
            include_scratch=False,
            noise_scheduler=scheduler,
        ).to_dict()
        for attack in report["attacks"]:
            finals.setdefault(attack["name"], {})[name] = attack["final"]["protected"]
    for attack, values in finals.items():
        print(f"{attack:40s} protected {values['protected']:.4f}  rescaled {values['rescaled']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "factors": factors, "before": before, "after_attack": finals}, f, indent=2)


if __name__ == "__main__":
    main()

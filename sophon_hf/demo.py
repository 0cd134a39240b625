"""`sophon-hf demo`: the whole story offline on real MNIST digits, in 6-8 minutes on 2 CPU cores (`--quick`: 1).

1. Pre-train a small Transformers image classifier on the original domain (digits 0-4).
2. Protect a copy with `SophonTrainer` against the restricted domain (digits 5-9), using the defender's own
   restricted images.
3. Attack the protected model, the unprotected original and a from-scratch model with a suite of real fine-tuning
   attacks, as an attacker who has a few labelled restricted images would.
4. Write both models, the report (JSON, Markdown, curves) and the model card; print a table.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch

from .attacks import evaluate_finetuning_resistance
from .config import SophonConfig
from .data import mnist_domains
from .tasks import ClassificationTask
from .trainer import SophonTrainer
from .utils import model_fingerprint, stop_if_diverged


@dataclass
class DemoSettings:
    """Everything the demo does, in one place (recorded in `demo_settings.json`)."""

    quick: bool = False
    seed: int = 0
    # Labelled restricted images the attacker fine-tunes on (a random sample, 1-7 per digit). Against scratch at its
    # best learning rate, pre-training's head start is visible with 20 (the unprotected model beats scratch in 6-24 of
    # the 52 standard attacks, by up to 7-15 points, RESULTS.md section 4a) and nearly gone with 50 (seed 0: 5 of 48
    # attacks, by at most 2 points, section 5i).
    attacker_images: int = 20
    pretrain_steps: int = 1000
    batch_size: int = 32
    suite: str | list = "standard"  # a suite name or a list of AttackSpec dicts
    steps_scale: float = 0.5  # standard suite budgets are 600 steps: 300 here, 3x the persistent attackers' horizon
    # The best balance measured on this setting (benchmarks/bench_ablation.py): the authors' code's inverse
    # cross-entropy, every simulated strategy, optimizers sampled per attacker, persistent attackers that fine-tune
    # for 100 steps (10 outer iterations) before a fresh one starts, restricted features suppressed, and three
    # normal-training steps per outer iteration to keep original accuracy, at constant step sizes.
    protection: dict = field(
        default_factory=lambda: {
            "max_steps": 300,
            "inner_steps": 10,
            "simulation_horizon": 100,
            "simulation_strategies": ["full", "full_reinit_head", "linear_probe", "lora"],
            "inner_optimizers": ["sgd_momentum:1e-2", "adam:1e-3", "rmsprop:1e-3"],
            "restricted_loss": "inverse_cross_entropy_negated_logits",
            "feature_suppression_weight": 1.0,
            "ntr_steps": 3,
            # Constant step sizes for both updates: Trainer's default linear decay of normal training (with a
            # suppression step that does not decay) cost 1-2 points of original accuracy at the end of training.
            "lr_scheduler_type": "constant",
        }
    )

    @classmethod
    def for_mode(cls, quick: bool, seed: int = 0) -> DemoSettings:
        if not quick:
            return cls(seed=seed)
        settings = cls(quick=True, seed=seed, pretrain_steps=500, suite="quick", steps_scale=0.5)
        settings.protection = {**settings.protection, "max_steps": 120}
        return settings


def demo_image_processor():
    """The demo's input pipeline as a Transformers image processor: a grayscale (`"L"`) image of any size becomes
    `pixel_values` of shape 1x28x28 in [0, 1] (resized, divided by 255, not normalised), as in `mnist_domains`."""
    try:  # the PIL backend needs no torchvision (transformers >= 5.x); it saves as a plain `ViTImageProcessor`
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True, size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 255, do_normalize=False
    )


def demo_model(seed: int = 0):
    """The demo's classifier: a small Transformers ResNet for 1x28x28 images with 5 classes (9.3k parameters)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        downsample_in_first_stage=False,
        num_labels=5,
        id2label={i: f"digit {i}" for i in range(5)},
        label2id={f"digit {i}": i for i in range(5)},
    )
    return ResNetForImageClassification(config)


def pretrain(model, dataset, steps: int, batch_size: int, seed: int):
    """Ordinary pre-training on the original domain with `transformers.Trainer` (Adam 1e-3, constant)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as scratch:  # Trainer's output folder: nothing is saved there
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            save_strategy="no",
            logging_steps=max(steps // 5, 1),
            seed=seed,
        )
        Trainer(model=model, args=args, train_dataset=dataset.with_format("torch")).train()
    return model


def run_demo(output_dir: str, quick: bool = False, seed: int = 0, settings: DemoSettings | None = None) -> dict:
    """Run the demo and write everything to `output_dir`. Returns the report as a dict.

    Args:
        output_dir (`str`): where the models, the report and the plots go.
        quick (`bool`, *optional*, defaults to `False`): the quick suite and a shorter protection (1-1.5 minutes on 2 CPU cores).
        seed (`int`, *optional*, defaults to `0`): seed of the data split, the models and the attacks.
        settings (`DemoSettings`, *optional*): override everything (`quick` and `seed` are then ignored).

    Example:
        ```python
        >>> from sophon_hf.demo import run_demo
        >>> report = run_demo("demo_output", quick=True)  # doctest: +SKIP
        ```
    """
    settings = settings or DemoSettings.for_mode(quick, seed)
    seed = settings.seed
    if seed < 0:
        raise ValueError(f"The demo's seed must be >= 0, got {seed}.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir} is a file: choose a folder for the demo's output (--output).")
    settings_path = os.path.join(output_dir, "demo_settings.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(asdict(settings))):
            # Before anything is overwritten: that folder holds another run's models, report and card.
            changed = sorted(k for k in {**previous, **asdict(settings)} if previous.get(k) != asdict(settings).get(k))
            raise ValueError(
                f"{output_dir} holds a demo run with other settings ({', '.join(changed)} differ). Choose another "
                "--output, or remove that folder to replace the run."
            )
    os.makedirs(output_dir, exist_ok=True)
    with open(settings_path, "w") as f:
        json.dump(asdict(settings), f, indent=2)
    started = time.time()

    data = mnist_domains(num_restricted_train=None, seed=seed)
    # The attacker and the defender hold different restricted images: the defender protects with its own data.
    attacker_train = data["restricted_train"].select(range(settings.attacker_images))
    defender_restricted = data["restricted_train"].select(
        range(settings.attacker_images, data["restricted_train"].num_rows)
    )
    # Saved so that `sophon-hf attack` / `verify` can re-run the measurement on exactly the attacker's data.
    attacker_train.save_to_disk(os.path.join(output_dir, "data", "attacker_train"))
    data["restricted_test"].save_to_disk(os.path.join(output_dir, "data", "restricted_test"))
    counts = torch.bincount(torch.as_tensor(attacker_train["labels"]), minlength=5).tolist()
    per_digit = "/".join(str(c) for c in counts)
    print(
        f"Original domain: MNIST digits 0-4 ({data['original_train'].num_rows} training images). Restricted domain: "
        f"digits 5-9. The attacker fine-tunes on {attacker_train.num_rows} labelled restricted images "
        f"({per_digit} of digits 5-9) and is scored on {data['restricted_test'].num_rows} held-out "
        "ones; the defender protects with its own restricted images.",
        flush=True,
    )

    print("\n[1/3] Pre-training the original classifier", flush=True)
    timings = {"pretraining_seconds": time.time()}
    unprotected = pretrain(
        demo_model(seed),
        data["original_train"],
        settings.pretrain_steps,
        settings.batch_size,
        seed,
    )
    timings["pretraining_seconds"] = time.time() - timings["pretraining_seconds"]
    # The demo's inputs as an image processor, saved with both models: grayscale images resized to 28x28 and scaled to
    # [0, 1], nothing else (`AutoImageProcessor.from_pretrained(folder)` then prepares anyone's images the same way).
    processor = demo_image_processor()
    unprotected.save_pretrained(os.path.join(output_dir, "unprotected"))
    processor.save_pretrained(os.path.join(output_dir, "unprotected"))

    print("\n[2/3] Protecting a copy with SOPHON", flush=True)
    timings["protection_seconds"] = time.time()
    protected = copy.deepcopy(unprotected)
    args = SophonConfig(
        output_dir=os.path.join(output_dir, "protected"),
        per_device_train_batch_size=settings.batch_size,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        seed=seed,
        original_domain="MNIST digits 0-4",
        restricted_domain="MNIST digits 5-9",
        **settings.protection,
    )
    trainer = SophonTrainer(
        protected,
        args=args,
        train_dataset=data["original_train"],
        restricted_dataset=defender_restricted,
        processing_class=processor,
    )
    trainer.train()
    timings["protection_seconds"] = time.time() - timings["protection_seconds"]
    task = ClassificationTask(unprotected)
    original_test = task.prepare_dataset(data["original_test"], "original_test")
    original = {
        "unprotected": task.evaluate(unprotected, original_test),
        "protected": task.evaluate(protected, original_test),
    }
    trainer.save_model()
    stop_if_diverged(trainer)  # attacking (and publishing) unfinished weights would measure nothing

    print(f"\n[3/3] Attacking protected, unprotected and from-scratch models ({settings.suite} suite)", flush=True)
    attack_dir = os.path.join(output_dir, "attack_runs")
    if _measured_other_weights(attack_dir, {model_fingerprint(protected), model_fingerprint(unprotected)}):
        # The same settings trained other weights (e.g. another thread count changes floating-point order): the
        # finished attack runs belong to the models just replaced, so they are measured again.
        print(f"The attack runs in {attack_dir} were measured on other weights: measuring again.", flush=True)
        shutil.rmtree(attack_dir)
    timings["attacks_seconds"] = time.time()
    report = evaluate_finetuning_resistance(
        protected,
        attacker_train,
        data["restricted_test"],
        attacks=settings.suite,
        reference_model=unprotected,
        include_scratch=True,
        steps_scale=settings.steps_scale,
        output_dir=attack_dir,
    )
    timings["attacks_seconds"] = time.time() - timings["attacks_seconds"]
    with open(os.path.join(output_dir, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    report.original = original
    report.save(output_dir)
    report.save(args.output_dir)  # the card and an upload take the measurement from the model folder
    trainer.create_model_card(output_dir=args.output_dir)

    result = report.to_dict()
    print(summary_table(result, time.time() - started, timings))
    print(
        f"\nWrote {output_dir}/: unprotected/, protected/ (with its model card and image processor), report.json, "
        "report.md, plots, data/ (the attacker's images and the restricted test set)."
    )
    return result


def _measured_other_weights(attack_dir: str, fingerprints: set[str]) -> bool:
    """Whether the harness's folder holds a report or finished runs (of an interrupted job) of other models."""
    found = []
    if os.path.isfile(os.path.join(attack_dir, "report.json")):
        with open(os.path.join(attack_dir, "report.json")) as f:
            found.append((json.load(f).get("fingerprints") or {}).get("protected"))
    runs = os.path.join(attack_dir, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if name.endswith(".json"):
            with open(os.path.join(runs, name)) as f:
                found.append(json.load(f).get("fingerprint"))
    return any(fingerprint not in fingerprints for fingerprint in found)


def summary_table(report: dict, seconds: float, timings: dict[str, float] | None = None) -> str:
    """A short plain-text table of the demo's outcome (and what each phase cost, when `timings` is given)."""
    original = report.get("original") or {}
    lines = [
        "",
        f"Original-domain accuracy: unprotected {original.get('unprotected', float('nan')):.3f}, "
        f"protected {original.get('protected', float('nan')):.3f}",
        "",
        f"{'attack':40s} {'protected':>9s} {'unprotected':>11s} {'scratch':>8s}",
    ]

    def cell(attack, start, width):  # the value the verdicts use; a diverged run shows its best value and a '*'
        value = attack["effective_final"].get(start)
        if value is None:
            return f"{'-':>{width}s}"
        mark = "*" if attack.get("diverged", {}).get(start) else ""
        return f"{value:.3f}{mark}".rjust(width)

    for attack in report["attacks"]:
        lines.append(
            f"{attack['name']:40s} {cell(attack, 'protected', 9)} {cell(attack, 'unprotected', 11)} "
            f"{cell(attack, 'scratch', 8)}"
        )
    attacks = report["attacks"]
    if any(any(a.get("diverged", {}).values()) for a in attacks):
        lines.append("* the run diverged (NaN loss): its best value before diverging")
    wins = sum(1 for a in attacks if a["head_start"] <= 0)
    close = sum(1 for a in attacks if a["largest_head_start"]["value"] <= 0.02)
    head_starts = sum(
        1
        for a in attacks
        if a["effective_final"].get("unprotected") is not None
        and round(a["effective_final"]["unprotected"] - a["effective_final"]["scratch"], 12) > 0
    )
    summary = report["summary"]
    recipe = report.get("scratch_recipe") or {}
    if recipe.get("learning_rates"):
        chosen = sorted({a["scratch_learning_rate"] for a in attacks if "scratch_learning_rate" in a})
        lines += [
            "",
            f"Scratch: {recipe.get('optimizer', 'adam')} at the best of learning rates "
            f"{', '.join(f'{r:g}' for r in recipe['learning_rates'])} (chosen: {', '.join(f'{r:g}' for r in chosen)}), "
            f"mean of {recipe.get('initialisations', 1)} initialisations.",
        ]
    lines += [
        "",
        f"Protected final accuracy <= scratch in {wins}/{len(attacks)} attacks; the unprotected model beats "
        f"scratch in {head_starts}/{len(attacks)}.",
        f"Protected never more than 2 points ahead of scratch at any evaluation point in {close}/{len(attacks)} "
        "attacks.",
        f"Worst attack: {summary['worst_attack']} (protected minus scratch: "
        f"{summary['worst_protected_minus_scratch']:+.3f}). Took {seconds / 60:.1f} min.",
    ]
    if timings:
        pretraining, protection = timings["pretraining_seconds"], timings["protection_seconds"]
        lines.append(
            f"Protection took {protection:.0f} s, {protection / pretraining:.1f}x the {pretraining:.0f} s of "
            f"pre-training; the attacks {timings['attacks_seconds'] / 60:.1f} min."
        )
    return "\n".join(lines)

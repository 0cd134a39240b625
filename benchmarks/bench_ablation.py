"""Ablation of protection recipes on the demo's setting, against the attacks that break SOPHON.

Setting (the same as `sophon-hf demo`): the demo's Transformers ResNet pre-trained on MNIST 0-4 (1000 Adam steps),
protected for 300 outer iterations with the defender's own restricted images, then attacked with 50 labelled images
of 5-9 for 300 steps each, scored on 500 held-out images; scratch is the same architecture trained from its config.

    python benchmarks/bench_ablation.py                              # every variant, seed 0, the six key attacks
    python benchmarks/bench_ablation.py --variants authors ice_code_features --seeds 0 1 2 --attacks standard
    python benchmarks/bench_ablation.py --variants demo --attacker-images 250     # a better-equipped attacker
    python benchmarks/bench_ablation.py --list

Prints, per variant: original accuracy (unprotected -> protected), then per attack the final restricted accuracy of
protected / unprotected / scratch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sophon_hf import AttackSpec, SophonConfig, SophonTrainer, evaluate_finetuning_resistance  # noqa: E402
from sophon_hf.attacks import resolve_attacks  # noqa: E402
from sophon_hf.data import mnist_domains  # noqa: E402
from sophon_hf.demo import DemoSettings, demo_model  # noqa: E402
from sophon_hf.losses import kl_uniform  # noqa: E402
from sophon_hf.simulation import SimulationView  # noqa: E402
from sophon_hf.tasks import ClassificationTask  # noqa: E402

ALL_STRATEGIES = ["full", "full_reinit_head", "linear_probe", "lora"]


def _demo_recipe(**changes) -> dict:
    """The demo's protection recipe (300 outer iterations and K=10 unless `changes` say otherwise), with `changes`."""
    recipe = {k: v for k, v in DemoSettings().protection.items() if k not in ("max_steps", "inner_steps")}
    return {**recipe, **changes}


SAMPLED_OPTIMIZERS = ["sgd_momentum:1e-2", "adam:1e-3", "rmsprop:1e-3"]
VARIANTS = {
    # The authors' recipe: SGD-only simulation with a fresh head, ICE (code variant), K=10 here (paper: 50).
    "authors": {
        "simulation_strategies": ["full_reinit_head"],
        "inner_optimizers": ["sgd:1e-4"],
        "restricted_loss": "inverse_cross_entropy_negated_logits",
    },
    "klu_sampled": {
        "simulation_strategies": ALL_STRATEGIES,
        "inner_optimizers": SAMPLED_OPTIMIZERS,
        "restricted_loss": "kl_uniform",
    },
    "ice_sampled": {
        "simulation_strategies": ALL_STRATEGIES,
        "inner_optimizers": SAMPLED_OPTIMIZERS,
        "restricted_loss": "inverse_cross_entropy",
    },
    "ice_code_sampled_fast": {
        "simulation_strategies": ["full", "full_reinit_head", "linear_probe"],
        "inner_optimizers": ["sgd_momentum:1e-2", "adam:1e-3"],
        "restricted_loss": "inverse_cross_entropy_negated_logits",
        "fts_learning_rate": 1e-3,
    },
    "klu_features": {
        "simulation_strategies": ALL_STRATEGIES,
        "inner_optimizers": SAMPLED_OPTIMIZERS,
        "restricted_loss": "kl_uniform",
        "fts_learning_rate": 1e-3,
        "feature_suppression_weight": 1.0,
    },
    "ice_code_features": {
        "simulation_strategies": ALL_STRATEGIES,
        "inner_optimizers": SAMPLED_OPTIMIZERS,
        "restricted_loss": "inverse_cross_entropy_negated_logits",
        "feature_suppression_weight": 0.3,
        "ntr_steps": 2,
    },
    # Every strategy and optimizer sampled, ICE as in the code, features 1.0, NTR x3; a fresh attacker every outer
    # iteration; Trainer's default linear learning-rate decay.
    "sampled_features": _demo_recipe(simulation_horizon=None, lr_scheduler_type="linear"),
    # The same with persistent attackers over 100 simulated steps (the demo's recipe before constant step sizes).
    "persistent": _demo_recipe(lr_scheduler_type="linear"),
    # The demo's default (sophon_hf.demo.DemoSettings): `persistent` at constant step sizes.
    "demo": _demo_recipe(),
    # `persistent` with the suppression step size decaying with normal training's.
    "demo_fts_schedule": _demo_recipe(lr_scheduler_type="linear", fts_follows_lr_schedule=True),
    # `persistent` with a fourth normal-training step per outer iteration.
    "persistent_ntr4": _demo_recipe(lr_scheduler_type="linear", ntr_steps=4),
    # Persistent attackers with a horizon as long as the real attacks (300 steps).
    "persistent_300": _demo_recipe(lr_scheduler_type="linear", simulation_horizon=300),
    # Persistent attackers that, like the real attacker, fine-tune on 50 restricted images each.
    "persistent_few_shot": _demo_recipe(lr_scheduler_type="linear", simulation_support_size=50),
    # The demo's recipe with exact second-order meta-gradients (fresh attackers: persistence needs first order).
    "second_order": _demo_recipe(first_order=False, simulation_horizon=None),
    # The demo's recipe whose fresh-head attackers also re-initialise everything above the first stage.
    "reinit_above_first_stage": _demo_recipe(),
    # The demo's recipe for twice as many outer iterations, with a fourth normal-training step to hold the original.
    "demo_600_ntr4": _demo_recipe(max_steps=600, ntr_steps=4),
    # The demo's recipe plus a suppression term on the first stage's output for restricted query batches (benchmark-
    # only trainer below): its activations driven to zero, or its class information (between-class over total
    # variance of the pooled activations) removed; weight 1 or 10.
    "stage1_zero": _demo_recipe(),
    "stage1_zero_x10": _demo_recipe(),
    "stage1_class_info": _demo_recipe(),
    "stage1_class_info_x10": _demo_recipe(),
    # The demo's recipe with Adam at 1e-2 among the simulated attackers too (the standard suite's strongest attack
    # against a tuned scratch baseline, seventh session).
    "demo_adam_1e-2": _demo_recipe(inner_optimizers=["sgd_momentum:1e-2", "adam:1e-3", "adam:1e-2", "rmsprop:1e-3"]),
    # The demo's recipe plus an outlier-exposure term in normal training (benchmark-only trainer below, eighth
    # session): the released model's own prediction on restricted batches made uniform (KL from uniform) or the same
    # for every restricted input (variance of the log-probabilities across the batch), at the weight in the name.
    "demo_oe_kl_0.3": _demo_recipe(),
    "demo_oe_constant_0.01": _demo_recipe(),
    "demo_oe_constant_0.1": _demo_recipe(),
    # The most extreme schedule over the attacker distribution: only the attackers that break the recipe.
    "worst_attackers_only": _demo_recipe(
        lr_scheduler_type="linear",
        simulation_strategies=["full_reinit_head"],
        inner_optimizers=["adam:1e-3", "rmsprop:1e-3"],
    ),
}


class ReinitAboveFirstStageTrainer(SophonTrainer):
    """Simulated `full_reinit_head` attackers keep only the stem and the first stage and re-initialise the rest.

    `bench_head_start.py` found the fresh-head attacker's remaining head start in those first layers; this attacker
    (the head-start experiment's) puts exactly them under the suppression gradient. Demo ResNet only.
    """

    kept = ("resnet.embedder.", "resnet.encoder.stages.0.")

    def _simulation_view(self, module, strategy, generator):
        if strategy != "full_reinit_head":
            return super()._simulation_view(module, strategy, generator)
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31 - 1, (), generator=generator)))
            fresh = dict(type(module)(module.config).named_parameters())
        kept = {n: p for n, p in params.items() if n.startswith(self.kept)}
        adapted = {n: kept[n] if n in kept else fresh[n].detach() for n in params}
        return SimulationView(module, adapted, buffers, {n: n for n in kept})


def _first_stage_zero(features, labels):
    return features.pow(2).mean()


def _first_stage_class_info(features, labels):
    """Between-class over total variance of the first stage's activations pooled to 4x4 (0: no class information)."""
    pooled = F.adaptive_avg_pool2d(features, 4).flatten(1)
    mean = pooled.mean(0)
    total = (pooled - mean).pow(2).sum(1).mean()
    between = sum(
        (labels == c).float().mean() * (pooled[labels == c].mean(0) - mean).pow(2).sum() for c in labels.unique()
    )
    return between / (total + 1e-8)


class _FirstStageSuppression:
    """Wraps a `ClassificationTask`: its suppression loss gains `weight * objective(first stage output, labels)`."""

    def __init__(self, task, objective, weight: float):
        self._task, self._objective, self._weight = task, objective, weight

    def __getattr__(self, name):
        return getattr(self._task, name)

    def suppression_loss(self, loss_name, model, batch, params=None, generator=None):
        stage = next(m for n, m in model.named_modules() if n.endswith("encoder.stages.0"))
        features = []
        handle = stage.register_forward_hook(lambda _module, _inputs, output: features.append(output))
        try:
            loss, logits = self._task.suppression_loss(loss_name, model, batch, params, generator=generator)
        finally:
            handle.remove()
        return loss + self._weight * self._objective(features[0], batch["labels"]), logits


class FirstStageSuppressionTrainer(SophonTrainer):
    """The demo's trainer with a representation-level suppression term on the first stage (demo ResNet only).

    Section 5c of RESULTS.md found the fresh-head attacker's remaining head start in the stem and first stage; this
    asks whether suppressing the restricted domain's activations there, rather than only at the output layer's input
    (`feature_suppression_weight`), removes it.
    """

    def __init__(self, *args, objective, weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = _FirstStageSuppression(self.task, objective, weight)


def _variance_across_inputs(logits):
    log_probs = F.log_softmax(logits.float(), -1)
    return (log_probs - log_probs.mean(0, keepdim=True)).pow(2).sum(-1).mean()


class OutlierExposureTrainer(SophonTrainer):
    """The demo's trainer plus an outlier-exposure term in every normal-training step (single process only).

    SOPHON suppresses only after simulated fine-tuning steps 1..K; before any fine-tuning the released head scores
    0.23-0.26 on the relabelled restricted digits against 0.21 for random heads (RESULTS.md section 4a), so every
    head-kept attack starts above scratch. This adds `weight * objective(logits)` of the model's own prediction on a
    restricted batch, in eval mode as an attack's step 0 sees it and through copies of the buffers, to the
    normal-training loss: KL from uniform (outlier exposure, Hendrycks et al. 2019, with the restricted domain as the
    outliers) or the variance of the log-probabilities across restricted inputs (one prediction for all of them).
    """

    def __init__(self, *args, objective, weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        # The term runs outside DDP's forward and is not reduced over ranks: one process only.
        assert self.args.world_size == 1, "OutlierExposureTrainer runs in one process"
        self._objective, self._weight = objective, weight
        self._outlier_generator = torch.Generator().manual_seed(self.args.seed)

    def _ntr_loss(self, model, batch, generator):
        loss = super()._ntr_loss(model, batch, generator)
        if loss is None:
            return None
        module = self.accelerator.unwrap_model(model)
        picked = torch.randint(
            len(self.restricted_dataset), (self.restricted_batch_size,), generator=self._outlier_generator
        )
        outliers = self._prepare_inputs(self._restricted_rows(picked))
        tensors = {**{n: b.clone() for n, b in module.named_buffers()}, **dict(module.named_parameters())}
        module.eval()
        try:
            logits = self.task.forward(module, outliers, tensors)
        finally:
            module.train()
        term = self._objective(logits)
        self._metrics["ntr/outlier_exposure"].append(term.item())
        return loss + self._weight * term


TRAINERS = {
    "reinit_above_first_stage": ReinitAboveFirstStageTrainer,
    **{
        f"stage1_{name}{suffix}": functools.partial(FirstStageSuppressionTrainer, objective=objective, weight=weight)
        for name, objective in (("zero", _first_stage_zero), ("class_info", _first_stage_class_info))
        for suffix, weight in (("", 1.0), ("_x10", 10.0))
    },
    **{
        f"demo_oe_{name}_{weight:g}": functools.partial(OutlierExposureTrainer, objective=objective, weight=weight)
        for name, objective, weight in (
            ("kl", kl_uniform, 0.3),
            ("constant", _variance_across_inputs, 0.01),
            ("constant", _variance_across_inputs, 0.1),
        )
    },
}
KEY_ATTACKS = [
    AttackSpec(strategy="full", optimizer="sgd_momentum", learning_rate=1e-2, steps=300),
    AttackSpec(strategy="full_reinit_head", optimizer="adam", learning_rate=1e-3, steps=300),
    AttackSpec(strategy="full", optimizer="adam", learning_rate=1e-3, steps=300),
    AttackSpec(strategy="linear_probe", optimizer="adam", learning_rate=1e-2, steps=300),
    AttackSpec(strategy="full_reinit_head", optimizer="rmsprop", learning_rate=1e-3, steps=300),
    AttackSpec(strategy="lora", optimizer="adam", learning_rate=1e-3, steps=300),
]


# The standard suite's strongest attacks against the demo's model (seventh and eighth sessions).
ADAM_1E_2_ATTACKS = [
    AttackSpec(strategy=strategy, optimizer="adam", learning_rate=1e-2, steps=300)
    for strategy in ("full_reinit_head", "full", "lora")
]


def _resized_demo_model(seed: int, **config_changes):
    """`demo_model(seed)`'s ResNet with some of its config changed (widths, depths), freshly initialised."""
    config = demo_model(seed).config
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return type(demo_model(seed))(config)


# Architectures for the capacity question (ninth session): is the fresh-head head start left after protection a limit
# of the demo's 9.3k-parameter ResNet, whose few first-layer filters serve both domains?
MODELS = {
    "demo": demo_model,
    # Twice the channels in every layer (34k parameters).
    "wide": functools.partial(_resized_demo_model, embedding_size=32, hidden_sizes=[32, 64, 128]),
    # Two bottleneck blocks per stage (15k parameters).
    "deep": functools.partial(_resized_demo_model, depths=[2, 2, 2]),
}


def pretrain(model, dataset, steps: int = 1000, seed: int = 0):
    task = ClassificationTask(model)
    rows = task.prepare_dataset(dataset, "original_train")[:]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(rows["labels"]), (32,), generator=generator)
        loss, _ = task.loss(model, {k: v[idx] for k, v in rows.items()})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def run(
    variant: str, seed: int, attacks, attacker_images: int = 50, make_model=demo_model, steps_scale: float = 1.0
) -> dict:
    """Pre-train `make_model(seed)`, protect a copy with `variant`, attack both; `make_model` defaults to the demo's."""
    data = mnist_domains(num_restricted_train=None, seed=seed)
    attacker = data["restricted_train"].select(range(attacker_images))
    defender = data["restricted_train"].select(range(attacker_images, data["restricted_train"].num_rows))
    started = time.time()
    unprotected = pretrain(make_model(seed), data["original_train"], seed=seed)
    pretrain_seconds = time.time() - started
    task = ClassificationTask(unprotected)
    original_test = task.prepare_dataset(data["original_test"], "original_test")
    protected = copy.deepcopy(unprotected)
    started = time.time()
    settings = {"max_steps": 300, "per_device_train_batch_size": 32, "inner_steps": 10, **VARIANTS[variant]}
    args = SophonConfig(
        output_dir=f"/tmp/sophon-ablation/{variant}-{seed}-{os.getpid()}",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        **settings,
    )
    TRAINERS.get(variant, SophonTrainer)(
        protected, args=args, train_dataset=data["original_train"], restricted_dataset=defender
    ).train()
    seconds = time.time() - started
    report = evaluate_finetuning_resistance(
        protected,
        attacker,
        data["restricted_test"],
        attacks=attacks,
        reference_model=unprotected,
        steps_scale=steps_scale,
    ).to_dict()
    return {
        "variant": variant,
        "seed": seed,
        "attacker_images": attacker_images,
        "protection_seconds": seconds,
        "pretrain_seconds": pretrain_seconds,
        "original": {
            "unprotected": task.evaluate(unprotected, original_test),
            "protected": task.evaluate(protected, original_test),
        },
        "final": {a["name"]: a["final"] for a in report["attacks"]},
        # Where each protected curve is furthest above scratch's (step 0: the released model's own head).
        "largest_head_start": {a["name"]: a["largest_head_start"] for a in report["attacks"]},
    }


def print_finals(finals: dict) -> None:
    """One line per attack: final restricted accuracy of protected / unprotected / scratch."""
    for name, final in finals.items():
        print(
            f"  {name:36s} protected {final['protected']:.3f}  unprotected {final['unprotected']:.3f}  "
            f"scratch {final['scratch']:.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--attacks",
        default="key",
        help="'key' (six attacks), 'adam_1e-2' (the three Adam 1e-2 attacks) or a suite name",
    )
    parser.add_argument(
        "--attack-seeds", type=int, default=1, help="run every attack at this many seeds (0, 1, ...; default 1)"
    )
    parser.add_argument("--attacker-images", type=int, default=50, help="labelled restricted images the attacker has")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every attack's budget (demo: 0.5)")
    parser.add_argument("--model", choices=list(MODELS), default="demo", help="the architecture (default: the demo's)")
    parser.add_argument("--json")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print(json.dumps(VARIANTS, indent=2))
        return
    attacks = {"key": KEY_ATTACKS, "adam_1e-2": ADAM_1E_2_ATTACKS}.get(args.attacks, args.attacks)
    if args.attack_seeds > 1:
        attacks = [
            dataclasses.replace(spec, seed=seed)
            for spec in resolve_attacks(attacks)
            for seed in range(args.attack_seeds)
        ]
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            r = run(
                variant,
                seed,
                attacks,
                args.attacker_images,
                make_model=MODELS[args.model],
                steps_scale=args.steps_scale,
            )
            r["model"] = args.model
            results.append(r)
            print(
                f"\n{variant} seed {seed}: original {r['original']['unprotected']:.3f} -> "
                f"{r['original']['protected']:.3f}, protection {r['protection_seconds']:.0f} s "
                f"({r['protection_seconds'] / r['pretrain_seconds']:.1f}x the {r['pretrain_seconds']:.0f} s of pre-training)"
            )
            print_finals(r["final"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

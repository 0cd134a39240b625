"""`SophonConfig`: the training arguments of `SophonTrainer`."""

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .losses import RESTRICTED_LOSSES
from .simulation import SIMULATION_STRATEGIES, parse_inner_optimizer


def _has_accelerator() -> bool:
    """A device DDP runs on other than the CPU: CUDA, or another accelerator accelerate knows (XPU, NPU, HPU, ...)."""
    import accelerate.utils

    if torch.cuda.is_available():
        return True
    names = ("is_xpu_available", "is_npu_available", "is_hpu_available", "is_mlu_available", "is_musa_available")
    return any(getattr(accelerate.utils, name, lambda: False)() for name in names)


@dataclass
class SophonConfig(TrainingArguments):
    r"""
    Configuration of [`SophonTrainer`]: SOPHON's non-fine-tunable learning (Deng et al., IEEE S&P 2024,
    arXiv 2404.12699) on top of [`~transformers.TrainingArguments`].

    One *outer iteration* (what `max_steps` counts) is one fine-tuning simulation (FTS) step that makes the
    restricted domain hard to fine-tune, followed by `ntr_steps` normal training reinforcement (NTR) steps on the
    original domain. `learning_rate` is the NTR step size; `fts_learning_rate` the suppression step size; each has
    its own Adam state, as in the authors' code (see README, "Design decisions").

    Parameters that control the suppression objective:
        restricted_loss (`str`, *optional*, defaults to `"inverse_cross_entropy"`):
            Loss minimised on the restricted domain after simulated fine-tuning: `"inverse_cross_entropy"` (the
            paper's `-log(1 - p_y)`, whose gradient vanishes once the true class is suppressed, hence the default),
            `"inverse_cross_entropy_negated_logits"` (the authors' code, `cross_entropy(-z, y)`), `"kl_uniform"`
            (KL from the uniform prediction, needs no labels) or `"denial_of_service"` (diffusion UNets).
        feature_suppression_weight (`float`, *optional*, defaults to `0.0`):
            Adds this times the mean squared *input of the output layer* on restricted query batches to the
            suppression loss: a representation-level objective that drives restricted-domain features (post-ReLU in
            CNNs) to zero, so that fine-tuning finds no information and, where units die, no gradient - rather than
            only a trap for the optimiser (in the spirit of representation noising, Rosati et al. 2024).
            Classifiers only.
        fts_learning_rate (`float`, *optional*, defaults to `3e-4`):
            Adam step size of the suppression (meta-gradient) update; the paper's alpha for ICE.
        fts_max_grad_norm (`float`, *optional*, defaults to `0.5`):
            The meta-gradient is clipped to this norm before the suppression step (authors' code). `0` disables.
        fts_follows_lr_schedule (`bool`, *optional*, defaults to `False`):
            Scale `fts_learning_rate` by the same factor as `lr_scheduler_type` scales `learning_rate` (warmup and
            decay), so that the balance between suppression and normal training stays the same to the end. By
            default the suppression step keeps its step size while normal training decays (the default schedule is
            linear), which leaves the last outer iterations to suppression alone.

    Parameters that control the fine-tuning simulation (the simulated attacker):
        simulation_strategies (`list[str]`, *optional*, defaults to `["full_reinit_head"]`):
            Attacker strategies sampled uniformly at each outer iteration: `"full"` (all weights, head kept),
            `"full_reinit_head"` (all weights, fresh head; the paper's ICE setting), `"linear_probe"` (fresh head,
            only the head adapts) and `"lora"` (fresh LoRA adapters through PEFT and the released head adapt, as in
            the real LoRA attack).
        inner_optimizers (`list[str]`, *optional*, defaults to `["sgd"]`):
            Simulated attacker optimizers, sampled at each outer iteration: `"sgd"`, `"sgd_momentum"`, `"adam"`,
            `"rmsprop"`, `"adagrad"`, each optionally with its own step size as `"name:lr"` (e.g. `"adam:1e-3"`);
            without one, `inner_learning_rate` is used.
        inner_steps (`int`, *optional*, defaults to `10`):
            Simulated fine-tuning steps K per outer iteration; the suppression loss is evaluated after every one.
            The paper uses 50; 10 keeps an outer iteration cheap and was enough in our measurements.
        inner_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Step size of the simulated attacker when its optimizer spec carries none. The authors' code uses SGD
            with 1e-4, far below what real attackers use; simulating realistic step sizes matters more.
        simulation_horizon (`int`, *optional*):
            Persistent attackers: a simulated attacker keeps fine-tuning across outer iterations (its offset from
            the model's weights, its fresh head or adapters and its optimizer state persist) until it has taken this
            many steps; then a fresh one is sampled. Each outer iteration still costs `inner_steps` steps, and the
            first-order suppression gradient is taken at every point of the long trajectory, so attacks far longer
            than `inner_steps` are simulated at no extra cost per iteration (the idea of persistent chains,
            Tieleman 2008, applied to the simulated attacker). Default: a fresh attacker every outer iteration, as
            in the paper. Needs `first_order=True`.
        simulation_support_size (`int`, *optional*):
            Each simulated attacker fine-tunes on a random subset of this many restricted examples (its support
            batches come from the subset, its query batches from the rest), like a real attacker with few
            labelled examples. Default: every attacker draws from all of `restricted_dataset`.
        restricted_batch_size (`int`, *optional*):
            Restricted examples per inner step (first half: support set for the inner update, second half: query set
            for the suppression loss). Defaults to `per_device_train_batch_size`.
        first_order (`bool`, *optional*, defaults to `True`):
            First-order meta-gradient (inner updates treated as constants), as in the authors' code. Second order
            costs 2-3x the time and much more memory.
        lora_r (`int`, *optional*, defaults to `8`), lora_alpha (`int`, *optional*, defaults to `16`),
        lora_target_modules (`list[str]`, *optional*):
            The simulated LoRA attacker's adapters; targets default to those of the attack harness
            (`sophon_hf.simulation.default_lora_targets`: a Diffusers UNet's attention projections and ResNet
            convolutions, else attention query/value projections, else every linear/conv layer of the body; never
            the head).
        head_name (`str`, *optional*):
            Dotted name of the classifier's output `nn.Linear`; found automatically when omitted.
        diffusion_timestep (`int`, *optional*):
            Diffusion only: evaluate the suppression loss at this fixed timestep (the authors' code uses 1). By
            default timesteps are sampled uniformly over the noise schedule.
        diffusion_timestep_range (`list[int]`, *optional*):
            Diffusion only: evaluate the suppression loss at timesteps drawn uniformly from `[low, high]` (inclusive),
            e.g. the low and mid noise levels where the two domains still look different.

    Parameters that control normal training reinforcement:
        ntr_steps (`int`, *optional*, defaults to `1`):
            Original-domain training steps per outer iteration, each on `per_device_train_batch_size` examples.
        original_accuracy_floor (`float`, *optional*):
            If set, evaluation on `eval_dataset` below this value stops training and restores the last weights that
            met it (the authors' code uses 0.8). Needs `eval_dataset` and an `eval_strategy`.

    Parameters for the model card:
        original_domain (`str`, *optional*), restricted_domain (`str`, *optional*):
            Human-readable names of the original and the restricted domains.

    Defaults that differ from `TrainingArguments`: `learning_rate=5e-4` (the paper's beta for ICE), `max_steps=1000`
    (outer iterations of the authors' code) unless `num_train_epochs` is given, `logging_steps=10`,
    `remove_unused_columns=False`.

    Epochs: an epoch is one pass of normal training over `train_dataset`, i.e.
    `len(train_dataset) / (per_device_train_batch_size * ntr_steps * world_size)` outer iterations (each outer iteration
    consumes `ntr_steps` batches). Give `num_train_epochs` without `max_steps` to train for that many epochs; when both
    are given, `max_steps` wins (as in `TrainingArguments`).
    """

    # Suppression objective
    restricted_loss: str = field(
        default="inverse_cross_entropy",
        metadata={"help": f"Suppression loss on the restricted domain, one of {RESTRICTED_LOSSES}."},
    )
    feature_suppression_weight: float = field(
        default=0.0, metadata={"help": "Weight of the restricted-feature suppression term (classifiers)."}
    )
    fts_learning_rate: float = field(default=3e-4, metadata={"help": "Adam step size of the suppression update."})
    fts_max_grad_norm: float = field(default=0.5, metadata={"help": "Clip norm of the meta-gradient (0 disables)."})
    fts_follows_lr_schedule: bool = field(
        default=False,
        metadata={"help": "Scale fts_learning_rate by the learning-rate schedule of normal training."},
    )
    # Fine-tuning simulation
    simulation_strategies: list[str] = field(
        default_factory=lambda: ["full_reinit_head"],
        metadata={"help": f"Simulated attacker strategies, sampled per outer iteration: {SIMULATION_STRATEGIES}."},
    )
    inner_optimizers: list[str] = field(
        default_factory=lambda: ["sgd"],
        metadata={
            "help": "Simulated attacker optimizers ('sgd', 'sgd_momentum', 'adam', 'rmsprop', 'adagrad'), "
            "optionally 'name:lr'; sampled per outer iteration."
        },
    )
    inner_steps: int = field(default=10, metadata={"help": "Simulated fine-tuning steps per outer iteration."})
    inner_learning_rate: float = field(default=1e-2, metadata={"help": "Default simulated attacker step size."})
    simulation_horizon: int | None = field(
        default=None,
        metadata={
            "help": "Persistent attackers: simulated steps before a fresh attacker starts (default: inner_steps)."
        },
    )
    simulation_support_size: int | None = field(
        default=None,
        metadata={"help": "Each simulated attacker fine-tunes on this many restricted examples (default: all)."},
    )
    restricted_batch_size: int | None = field(
        default=None, metadata={"help": "Restricted examples per inner step (support + query halves)."}
    )
    first_order: bool = field(default=True, metadata={"help": "First-order meta-gradient (False: second order)."})
    lora_r: int = field(default=8, metadata={"help": "Rank of the simulated LoRA attacker."})
    lora_alpha: int = field(default=16, metadata={"help": "Alpha of the simulated LoRA attacker."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the simulated LoRA attacker adapts (default: body projections)."}
    )
    head_name: str | None = field(default=None, metadata={"help": "Name of the classifier's output nn.Linear."})
    diffusion_timestep: int | None = field(
        default=None, metadata={"help": "Diffusion: fixed suppression timestep (default: uniform over the schedule)."}
    )
    diffusion_timestep_range: list[int] | None = field(
        default=None, metadata={"help": "Diffusion: suppression timesteps uniform in [low, high] (inclusive)."}
    )
    # Normal training reinforcement
    ntr_steps: int = field(default=1, metadata={"help": "Original-domain training steps per outer iteration."})
    original_accuracy_floor: float | None = field(
        default=None,
        metadata={"help": "Stop and restore the last weights that met it when original accuracy falls below."},
    )
    # Model card
    original_domain: str | None = field(default=None, metadata={"help": "Name of the original domain (model card)."})
    restricted_domain: str | None = field(
        default=None, metadata={"help": "Name of the restricted domain (model card)."}
    )
    # Defaults that differ from TrainingArguments
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam step size of normal training (NTR)."})
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Number of outer iterations (default: 1000, or num_train_epochs epochs when that is given)."
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs of normal training over train_dataset, used when max_steps is not given."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X outer iterations."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: datasets are reduced to the model's inputs by the trainer."}
    )

    def __post_init__(self):
        # `max_steps` defaults to 1000 outer iterations, but an explicit `num_train_epochs` alone must not be ignored.
        if self.max_steps is None:
            self.max_steps = -1 if self.num_train_epochs is not None else 1000
        if self.num_train_epochs is None:
            self.num_train_epochs = 3.0
        if self.restricted_loss not in RESTRICTED_LOSSES:
            raise ValueError(f"Unknown restricted_loss={self.restricted_loss!r}; choose one of {RESTRICTED_LOSSES}.")
        if isinstance(self.simulation_strategies, str):
            self.simulation_strategies = [self.simulation_strategies]
        if not self.simulation_strategies:
            raise ValueError(f"simulation_strategies is empty; give at least one of {SIMULATION_STRATEGIES}.")
        unknown = [s for s in self.simulation_strategies if s not in SIMULATION_STRATEGIES]
        if unknown:
            raise ValueError(f"Unknown simulation strategy {unknown}; choose from {SIMULATION_STRATEGIES}.")
        if isinstance(self.inner_optimizers, str):
            self.inner_optimizers = [self.inner_optimizers]
        if not self.inner_optimizers:
            raise ValueError("inner_optimizers is empty; give at least one, e.g. ['sgd'].")
        if not self.inner_learning_rate > 0:
            raise ValueError(f"inner_learning_rate must be positive, got {self.inner_learning_rate}.")
        if not self.fts_learning_rate >= 0:
            raise ValueError(
                f"fts_learning_rate must be >= 0 (0 turns the suppression step off), got {self.fts_learning_rate}."
            )
        for spec in self.inner_optimizers:
            parse_inner_optimizer(spec, self.inner_learning_rate)  # raises with the list of valid names
        for name in ("inner_steps", "ntr_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive (0 would freeze the LoRA updates), got {self.lora_alpha}.")
        if self.fts_follows_lr_schedule and not self.learning_rate > 0:
            raise ValueError(
                "fts_follows_lr_schedule scales the suppression step by the schedule's share of learning_rate, which "
                f"is {self.learning_rate}: set learning_rate > 0 or fts_follows_lr_schedule=False."
            )
        if self.simulation_horizon is not None:
            if self.simulation_horizon < self.inner_steps:
                raise ValueError(
                    f"simulation_horizon={self.simulation_horizon} is shorter than inner_steps={self.inner_steps}; "
                    "set it to a multiple of inner_steps (or None for a fresh attacker every outer iteration)."
                )
            if self.simulation_horizon % self.inner_steps:
                raise ValueError(
                    f"simulation_horizon={self.simulation_horizon} is not a multiple of inner_steps={self.inner_steps}:"
                    " an attacker takes inner_steps steps per outer iteration, so its horizon counts in those."
                )
            if not self.first_order:
                raise ValueError("simulation_horizon (persistent attackers) needs first_order=True.")
        if self.feature_suppression_weight < 0:
            raise ValueError(
                f"feature_suppression_weight must be >= 0 (0 disables the term), got {self.feature_suppression_weight}."
            )
        if self.fts_max_grad_norm < 0:
            raise ValueError(f"fts_max_grad_norm must be >= 0 (0 disables clipping), got {self.fts_max_grad_norm}.")
        if self.diffusion_timestep is not None and self.diffusion_timestep_range is not None:
            raise ValueError("Set diffusion_timestep (one timestep) or diffusion_timestep_range, not both.")
        if self.diffusion_timestep_range is not None and len(self.diffusion_timestep_range) != 2:
            raise ValueError(f"diffusion_timestep_range={self.diffusion_timestep_range} must be [low, high].")
        if self.simulation_support_size is not None and self.simulation_support_size < 1:
            raise ValueError(f"simulation_support_size must be >= 1, got {self.simulation_support_size}.")
        if self.restricted_batch_size is not None and self.restricted_batch_size < 2:
            raise ValueError("restricted_batch_size must be >= 2 (it is split into support and query halves).")
        if self.original_accuracy_floor is not None and not 0 < self.original_accuracy_floor <= 1:
            raise ValueError(f"original_accuracy_floor must be in (0, 1], got {self.original_accuracy_floor}.")
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                "SophonTrainer needs gradient_accumulation_steps=1: an outer iteration is a sequence of dependent "
                "steps. Raise per_device_train_batch_size / restricted_batch_size instead."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "SophonTrainer does not support auto_find_batch_size: an outer iteration reads ntr_steps batches at "
                "once, which Trainer's batch-size search does not know. Set per_device_train_batch_size instead."
            )
        if self.fsdp or self.deepspeed:
            raise ValueError(
                "SophonTrainer supports single-device and DDP training (`accelerate launch --multi_gpu`), not FSDP or "
                "DeepSpeed: the functional fine-tuning simulation needs every rank to hold the full weights."
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _has_accelerator():
            # `accelerate launch` on a machine without a GPU does not hand the config's use_cpu to the processes:
            # Trainer would then run WORLD_SIZE unconnected copies that each save their own weights.
            raise ValueError(
                f"{os.environ['WORLD_SIZE']} processes were launched on a machine without a GPU, but use_cpu=False: "
                "Trainer would run unconnected copies. Set use_cpu=True (`--use_cpu true` in the recipe scripts) to "
                "train them as one DDP job on the CPU."
            )
        super().__post_init__()

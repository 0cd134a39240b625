"""`SophonTrainer`: SOPHON non-fine-tunable learning as a `transformers.Trainer` subclass."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_utils import EvalPrediction, HubStrategy

from .config import SophonConfig
from .simulation import (
    InnerOptimizer,
    SimulationView,
    build_lora_copy,
    fresh_lora_weights,
    parse_inner_optimizer,
    simulate_finetuning,
)
from .tasks import check_finite, get_task, is_diffusers_model, non_finite_columns
from .utils import ATTACKER_STATE_NAME, FLOOR_STATE_NAME, model_fingerprint, pickle_weights_hint

logger = logging.getLogger(__name__)

FTS_OPTIMIZER_NAME = "fts_optimizer.pt"
RESTRICTED_IN_MEMORY_BYTES = 2 * 1024**3


class _Accuracy:
    """The default `compute_metrics` of classifiers; with `batch_eval_metrics=True` it counts over the batches."""

    def __init__(self):
        self.correct = self.total = 0

    def __call__(self, eval_prediction: EvalPrediction, compute_result: bool = True) -> dict[str, float] | None:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        self.correct += int((predictions.argmax(-1) == labels).sum())
        self.total += int(labels.shape[0])
        if not compute_result:
            return None
        accuracy, self.correct, self.total = self.correct / max(self.total, 1), 0, 0
        return {"accuracy": accuracy}


@dataclass
class _PersistentAttacker:
    """A simulated attacker that keeps fine-tuning across outer iterations (`SophonConfig.simulation_horizon`)."""

    strategy: str
    spec: str
    optimizer: InnerOptimizer
    steps: int = 0
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)  # adapted model weights minus the model's
    own: dict[str, torch.Tensor] = field(default_factory=dict)  # the attacker's fresh head or LoRA adapters
    support_pool: torch.Tensor | None = None  # indices of the few restricted examples this attacker trains on

    def to_safetensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"offsets.{n}": t for n, t in self.offsets.items()}
        tensors.update({f"own.{n}": t for n, t in self.own.items()})
        for name, state in self.optimizer.state.items():
            tensors.update({f"optimizer.{key}.{name}": t for key, t in state.items()})
        if self.support_pool is not None:
            tensors["support_pool"] = self.support_pool
        metadata = {"strategy": self.strategy, "spec": self.spec, "steps": str(self.steps), "t": str(self.optimizer.t)}
        return {k: t.detach().contiguous() for k, t in tensors.items()}, metadata

    @classmethod
    def from_safetensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> _PersistentAttacker:
        optimizer = parse_inner_optimizer(metadata["spec"], default_lr=1.0)  # the spec always carries its lr here
        optimizer.t = int(metadata["t"])
        attacker = cls(metadata["strategy"], metadata["spec"], optimizer, steps=int(metadata["steps"]))
        for key, tensor in tensors.items():
            group, _, name = key.partition(".")
            if group == "offsets":
                attacker.offsets[name] = tensor
            elif group == "own":
                attacker.own[name] = tensor
            elif group == "optimizer":
                state_key, _, name = name.partition(".")
                optimizer.state.setdefault(name, {})[state_key] = tensor
            else:
                attacker.support_pool = tensor
        return attacker


# Options of `Trainer.create_model_card` that a SOPHON card does not use (Trainer's example scripts pass them).
TRAINER_CARD_OPTIONS = frozenset({"language", "tasks", "dataset_tags", "dataset_args"})


def _is_hub_model_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@contextlib.contextmanager
def _without_activation_checkpointing(*modules: nn.Module):
    """Run checkpointed layers (Transformers' and Diffusers' `gradient_checkpointing` flag) without checkpointing.

    A checkpointed layer recomputes its forward during backward through the module's own parameters, after
    `functional_call` has put them back: the simulated attacker's gradients would be taken at the model's weights,
    not at its fast weights. Normal training keeps checkpointing.
    """
    flagged = [
        m for module in modules for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True
    ]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}


def _check_attention_has_second_derivatives(model: nn.Module) -> None:
    """Refuse second-order meta-gradients through attention kernels that have no double backward.

    PyTorch's fused `scaled_dot_product_attention` kernels (what Transformers' "sdpa" and Diffusers' default attention
    processor call) raise deep inside the first outer iteration when differentiated twice.
    """
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager"):
        raise ValueError(
            f"first_order=False differentiates twice through attention, and this model's attention implementation "
            f"{implementation!r} has no second derivative. Load the model with attn_implementation='eager' "
            "(`from_pretrained(..., attn_implementation='eager')`, or `attn_implementation: eager` in a recipe), or "
            "keep first_order=True."
        )
    processors = {type(m.processor).__name__ for m in model.modules() if hasattr(m, "set_processor")}
    if processors - {"AttnProcessor"}:
        raise ValueError(
            f"first_order=False differentiates twice through attention, and this UNet's attention processors "
            f"({', '.join(sorted(processors - {'AttnProcessor'}))}) call PyTorch's scaled_dot_product_attention, which "
            "has no second derivative. Switch them to the classic processor first: `from "
            "diffusers.models.attention_processor import AttnProcessor`, then `unet.set_attn_processor(AttnProcessor())` "
            "(UNet2DConditionModel) or `module.set_processor(AttnProcessor())` on each attention module; or keep "
            "first_order=True."
        )


class SophonTrainer(Trainer):
    """
    Trainer for SOPHON non-fine-tunable learning (Deng et al., "SOPHON: Non-Fine-Tunable Learning to Restrain Task
    Transferability For Pre-trained Models", IEEE S&P 2024).

    Each outer iteration simulates an attacker fine-tuning the model on `restricted_dataset` (a strategy and an
    optimizer sampled from `args`), takes one suppression step along the meta-gradient (first order by default,
    `first_order=False` for the exact one) of the suppression loss measured after every simulated step, then
    `args.ntr_steps` ordinary training steps on `train_dataset` so the original task keeps working.

    Args:
        model (`nn.Module`):
            A Transformers `*ForImageClassification` / `*ForSequenceClassification` model, a plain module whose
            forward returns logits, or a Diffusers `UNet2DModel` denoiser (with `noise_scheduler`).
        args (`SophonConfig`):
            Training arguments; `max_steps` counts outer iterations.
        train_dataset (`datasets.Dataset`):
            Original-domain training data (`pixel_values` or `input_ids`/`attention_mask`, and `labels`).
        restricted_dataset (`datasets.Dataset`):
            Restricted-domain data to make non-fine-tunable, same columns.
        eval_dataset (`datasets.Dataset`, *optional*):
            Original-domain evaluation data, logged as `eval_original_*`.
        restricted_eval_dataset (`datasets.Dataset`, *optional*):
            Restricted-domain evaluation data, logged as `eval_restricted_*` (the model as released, before any
            fine-tuning).
        noise_scheduler (*optional*):
            A Diffusers scheduler, for UNet denoisers.

    Example:
        ```python
        from sophon_hf import SophonConfig, SophonTrainer

        args = SophonConfig(output_dir="protected", max_steps=300, simulation_strategies=["full_reinit_head"])
        trainer = SophonTrainer(model, args=args, train_dataset=original, restricted_dataset=restricted)
        trainer.train()
        trainer.save_model()
        ```
    """

    _tag_names = ["sophon", "non-fine-tunable"]
    _name = "SOPHON"
    _paper = {
        "title": "SOPHON: Non-Fine-Tunable Learning to Restrain Task Transferability For Pre-trained Models",
        "id": "2404.12699",
    }

    def __init__(
        self,
        model: nn.Module,
        args: SophonConfig | None = None,
        train_dataset=None,
        restricted_dataset=None,
        eval_dataset=None,
        restricted_eval_dataset=None,
        noise_scheduler=None,
        data_collator=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        processing_class=None,
    ):
        # Args
        if args is None:
            args = SophonConfig(output_dir=f"{type(model).__name__}-SOPHON")
        if not isinstance(args, SophonConfig):
            raise TypeError(f"args must be a SophonConfig, got {type(args).__name__}.")
        if restricted_dataset is None:
            raise ValueError(
                "SophonTrainer needs `restricted_dataset`: the domain the model must become non-fine-tunable for."
            )
        if args.original_accuracy_floor is not None and (eval_dataset is None or args.eval_strategy == "no"):
            raise ValueError(
                "original_accuracy_floor needs `eval_dataset` (original-domain test data) and an eval_strategy such "
                "as eval_strategy='steps' with eval_steps=50."
            )

        # Model and task
        self.task = get_task(
            model,
            head_name=args.head_name,
            noise_scheduler=noise_scheduler,
            diffusion_timestep=tuple(args.diffusion_timestep_range)
            if args.diffusion_timestep_range
            else args.diffusion_timestep,
        )
        is_denoiser = self.task.name == "unconditional-image-generation"
        if not args.first_order:
            _check_attention_has_second_derivatives(model)
        if args.restricted_loss == "denial_of_service" and not is_denoiser:
            raise ValueError(
                "restricted_loss='denial_of_service' is for diffusion UNets; classifiers use "
                "'inverse_cross_entropy', 'inverse_cross_entropy_negated_logits' or 'kl_uniform'."
            )
        if is_denoiser and args.original_accuracy_floor is not None:
            raise ValueError("original_accuracy_floor applies to classifiers; diffusion UNets have no accuracy.")
        if is_denoiser and args.feature_suppression_weight:
            raise ValueError(
                "feature_suppression_weight applies to classifiers (the output layer's input); set it to 0."
            )
        if is_denoiser and args.restricted_loss != "denial_of_service":
            raise ValueError(
                f"restricted_loss={args.restricted_loss!r} is a classification loss; diffusion UNets use "
                "restricted_loss='denial_of_service'."
            )
        if is_denoiser and args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor applies to classifiers; diffusion UNets have no labels.")
        if is_denoiser and {"full_reinit_head", "linear_probe"} & set(args.simulation_strategies):
            raise ValueError(
                f"simulation_strategies={args.simulation_strategies} includes head strategies, but a diffusion UNet "
                "has no head: use ['full'] or ['full', 'lora']."
            )

        if args.activation_checkpointing:  # also set by its alias `gradient_checkpointing`
            # Trainer turns it on with Transformers' `activation_checkpointing_enable`, which Diffusers models lack
            # (they have `enable_gradient_checkpointing`) and plain modules lack altogether.
            if is_diffusers_model(model):
                model.enable_gradient_checkpointing()
                args.activation_checkpointing = args.gradient_checkpointing = False  # done: Trainer must not retry
            elif not hasattr(model, "activation_checkpointing_enable") and not hasattr(
                model,
                "gradient_checkpointing_enable",  # the older name, which Trainer still calls
            ):
                raise ValueError(
                    f"gradient_checkpointing=True needs a Transformers or Diffusers model; a {type(model).__name__} "
                    "cannot turn it on. Set gradient_checkpointing=False, or checkpoint inside the module yourself."
                )

        # Data
        if isinstance(eval_dataset, dict) and not hasattr(eval_dataset, "column_names"):
            raise ValueError(
                f"`eval_dataset` is a dict of datasets ({list(eval_dataset)}): SophonTrainer evaluates one "
                "original-domain test split (`eval_dataset`, metrics `eval_original_*`) and one restricted-domain "
                "split (`restricted_eval_dataset`, `eval_restricted_*`). Pass one split here; evaluate others with "
                "`trainer.evaluate({'name': dataset, ...})`."
            )
        train_dataset = self.task.prepare_dataset(train_dataset, "train_dataset")
        self.restricted_dataset = self.task.prepare_dataset(restricted_dataset, "restricted_dataset")
        eval_datasets = {}
        if eval_dataset is not None:
            eval_datasets["original"] = self.task.prepare_dataset(eval_dataset, "eval_dataset")
        if restricted_eval_dataset is not None:
            eval_datasets["restricted"] = self.task.prepare_dataset(restricted_eval_dataset, "restricted_eval_dataset")
        self.restricted_batch_size = args.restricted_batch_size or args.per_device_train_batch_size
        shard_size = len(self.restricted_dataset) // args.world_size
        if args.simulation_support_size is not None and args.simulation_support_size >= shard_size:
            raise ValueError(
                f"simulation_support_size={args.simulation_support_size} leaves no held-out query examples: each of "
                f"the {args.world_size} process(es) holds {shard_size} restricted examples. Set it below {shard_size} "
                "or give more restricted data."
            )
        if self.restricted_batch_size < 2:
            raise ValueError(
                "The restricted batch needs >= 2 examples (support and query); set restricted_batch_size."
            )

        # Simulated LoRA attacker: a PEFT-wrapped copy whose base tensors are replaced by the model's at every call
        self._lora = None
        if "lora" in args.simulation_strategies:
            self._lora = build_lora_copy(
                model, self.task.head_name, args.lora_r, args.lora_alpha, args.lora_target_modules
            )

        self._restricted_tensors: dict[str, torch.Tensor] | None = None
        self._attacker: _PersistentAttacker | None = None
        self._metrics = defaultdict(list)
        self._best_state: dict[str, torch.Tensor] | None = None
        self.stop_reason: str | None = None
        self.diverged = False  # stopped on a non-finite loss or meta-gradient: the weights are no finished protection
        self.stopped_at: int | None = None  # outer iterations completed when training stopped
        metric = args.metric_for_best_model
        if metric is not None and compute_metrics is None and eval_datasets:
            # Evaluation metrics are namespaced per dataset: fail now, not after the first `eval_steps` iterations.
            names = ["loss"] + ([self.task.metric_name] if self.task.metric_name == "accuracy" else [])
            allowed = [f"{split}_{name}" for split in eval_datasets for name in names]
            # The original domain's metric: the restricted one would keep the checkpoint that protects least.
            example = next((m for m in (f"original_{names[-1]}", "original_loss") if m in allowed), allowed[0])
            if metric.removeprefix("eval_") not in allowed:
                raise ValueError(
                    f"metric_for_best_model={metric!r} is not an evaluation metric of SophonTrainer: evaluations are "
                    f"logged per dataset, choose one of {allowed} (e.g. metric_for_best_model={example!r})."
                )
        if args.push_to_hub and args.hub_strategy != HubStrategy.END:
            logger.warning(
                "push_to_hub=True with hub_strategy=%r: SophonTrainer uploads no checkpoints (their weights are not "
                "measured); `trainer.save_model()` / `trainer.push_to_hub()` upload the final model.",
                HubStrategy(args.hub_strategy).value,
            )
        # Label smoothing is applied to normal training by `_ntr_loss`; Trainer's own LabelSmoother is never used (and
        # reads `model.config`, which plain modules lack).
        label_smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator or _collate,
                train_dataset=train_dataset,
                eval_dataset=eval_datasets or None,
                processing_class=processing_class,
                compute_metrics=compute_metrics or (_Accuracy() if self.task.metric_name == "accuracy" else None),
                callbacks=callbacks,
                optimizers=optimizers,
            )
        finally:
            args.label_smoothing_factor = label_smoothing
        # Every NTR step of an outer iteration gets a full per-device batch.
        self._train_batch_size = self._train_batch_size * args.ntr_steps
        self.fts_optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ optimizers and checkpoints
    def _get_fts_optimizer(self) -> torch.optim.Optimizer:
        # A separate Adam state for the suppression step, as in the authors' code (README: design decisions).
        # Created lazily: Trainer's optimizer may come from the user (`optimizers=`) and skip `create_optimizer`.
        if self.fts_optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.fts_optimizer = torch.optim.Adam(params, lr=self.args.fts_learning_rate)
        return self.fts_optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.fts_optimizer is not None:
            torch.save(self.fts_optimizer.state_dict(), os.path.join(output_dir, FTS_OPTIMIZER_NAME))
        if self._attacker is not None:  # every rank keeps its own persistent attacker
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, ATTACKER_STATE_NAME.format(self.args.process_index))
            tensors, metadata = self._attacker.to_safetensors()
            safetensors.torch.save_file(tensors, path, metadata=metadata)
        if self.args.should_save and self._best_state is not None:
            # The accuracy floor restores these weights: a resumed run must still have them.
            tensors = {k: v.contiguous() for k, v in self._best_state.items()}
            safetensors.torch.save_file(tensors, os.path.join(output_dir, FLOOR_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, FTS_OPTIMIZER_NAME)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
                raise FileNotFoundError(
                    f"{path} is missing: this checkpoint holds Trainer's optimizer state but not SophonTrainer's "
                    "(the suppression optimizer), so it was not written by SophonTrainer."
                )
            # As Trainer does with a model-only checkpoint (`save_only_model=True`): resume from the weights alone.
            logger.warning(
                "%s holds the model only (written with save_only_model=True?): the suppression optimizer, the "
                "simulated attackers and the accuracy floor's weights start afresh, so the resumed run continues but "
                "does not replay the interrupted one exactly.",
                checkpoint,
            )
            return
        # Read onto the CPU and move afterwards: under multi-process CPU training `args.device` is `cpu:0`, a location
        # neither torch.load nor safetensors accepts.
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._get_fts_optimizer().load_state_dict(state)
        path = os.path.join(checkpoint, ATTACKER_STATE_NAME.format(self.args.process_index))
        if os.path.isfile(path):
            with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                tensors = {key: f.get_tensor(key).to(self.args.device) for key in f.keys()}
                self._attacker = _PersistentAttacker.from_safetensors(tensors, f.metadata())
        path = os.path.join(checkpoint, FLOOR_STATE_NAME)
        if os.path.isfile(path):
            self._best_state = {
                k: v.to(self.args.device) for k, v in safetensors.torch.load_file(path, device="cpu").items()
            }

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        module = self.accelerator.unwrap_model(self.model)
        if is_diffusers_model(module):
            self._save_diffusers(module, output_dir)
        else:
            super()._save(output_dir, state_dict)
        if self.task.name == "text-classification" and self.processing_class is None and self.args.should_save:
            logger.warning(
                "Saving a text classifier without its tokenizer: pass `processing_class=tokenizer` to SophonTrainer "
                "(or save the tokenizer into %s) so that the folder can be used and published as it is.",
                output_dir,
            )
        # Every saved folder (final model and checkpoints) carries its model card.
        self.create_model_card(output_dir=output_dir)

    def _save_diffusers(self, module: nn.Module, output_dir: str) -> None:
        # Diffusers models are saved in their own folder format (config.json + diffusion_pytorch_model.safetensors),
        # never as a raw state dict, so that `UNet2DModel.from_pretrained` and pipelines load them.
        if self.args.should_save:
            module.save_pretrained(output_dir, safe_serialization=True)
            # The scheduler travels with the UNet: denoising numbers (and `sophon-hf verify`) depend on it.
            self.task.noise_scheduler.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    # ------------------------------------------------------------------ model card and Hub
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        license: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> None:
        """Write `README.md` (the SOPHON model card) into `output_dir` (default: `args.output_dir`).

        The card includes the measured resistance when the folder holds a `report.json` (written by
        `report.save(folder)` or `sophon-hf attack --output folder`), and says plainly that resistance has not been
        measured otherwise. Only the main process writes. The publisher's fields (`license`, datasets, `tags`,
        `model_name`, `finetuned_from`) are kept next to the card and survive later rewrites.

        Args:
            model_name (`str`, *optional*): title and `model-index` name (default: the output folder's name).
            dataset_name / dataset (`str` or `list[str]`, *optional*): Hub dataset ids (Trainer's two spellings).
            tags (`str` or `list[str]`, *optional*): extra Hub tags.
            output_dir (`str`, *optional*): the folder (default: `args.output_dir`).
            license (`str`, *optional*): license identifier, e.g. `"apache-2.0"`.
            finetuned_from (`str`, *optional*): Hub id of the unprotected model (default: the model's
                `_name_or_path` when it is a Hub id).
            repo_id (`str`, *optional*): the repo the card will live in (default: `args.hub_model_id`).
            revision (`str`, *optional*): the branch of that repo, when not the default one (the card's usage lines
                load it).
        """
        ignored = sorted(set(kwargs) & TRAINER_CARD_OPTIONS)
        if ignored:
            # Trainer's example scripts pass these; a SOPHON card has no place for them.
            logger.warning("create_model_card: %s do not appear on a SOPHON card and are ignored.", ignored)
        unknown = sorted(set(kwargs) - TRAINER_CARD_OPTIONS)
        if unknown:
            raise TypeError(
                f"create_model_card got unsupported argument(s) {unknown}; SophonTrainer's card takes model_name, "
                "dataset_name/dataset, tags, license, finetuned_from, repo_id and revision."
            )
        if not self.is_world_process_zero():
            return
        from .model_card import CARD_METADATA_FILE, write_model_card

        output_dir = output_dir or self.args.output_dir
        module = self.accelerator.unwrap_model(self.model)
        base_model = finetuned_from or getattr(getattr(module, "config", None), "_name_or_path", None) or None
        if base_model is not None and not _is_hub_model_id(base_model):
            if finetuned_from is not None:
                logger.warning("finetuned_from=%r is not a Hub model id: the card names no base model.", base_model)
            # A local folder is no Hub reference, and publishing it leaks a path. (A relative path that no longer
            # exists and reads like "user/name" cannot be told from a Hub id.)
            base_model = None
        sidecar = os.path.join(output_dir, CARD_METADATA_FILE)
        stored = {}
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                stored = json.load(f)
        # The publisher's earlier choices (a name, tags) survive this rewrite; new ones are added.
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags = list(dict.fromkeys([*self._tag_names, *(stored.get("tags") or []), *tags]))
        dataset_name = dataset_name or dataset
        datasets = [dataset_name] if isinstance(dataset_name, str) else dataset_name
        # A report.json left by an earlier measurement is only published for the weights it measured.
        has_report = os.path.isfile(os.path.join(output_dir, "report.json"))
        write_model_card(
            output_dir,
            weights_fingerprint=model_fingerprint(module) if has_report else None,
            model_name=model_name or stored.get("model_name") or os.path.basename(os.path.abspath(output_dir)),
            base_model=base_model,
            task=self.task.name,
            library_name="diffusers" if is_diffusers_model(module) else "transformers",
            model_class=type(module).__name__,
            original_domain=self.args.original_domain,
            restricted_domain=self.args.restricted_domain,
            # An early stop is part of what the weights are: the card says after how many outer iterations, and why.
            sophon_config={
                **self.args.to_dict(),
                **(
                    {
                        "stop_reason": self.stop_reason,
                        "diverged": self.diverged,
                        "completed_outer_iterations": self.stopped_at,
                        "planned_outer_iterations": self.state.max_steps,
                    }
                    if self.stop_reason
                    else {}
                ),
            },
            datasets=datasets,
            repo_id=repo_id or self.args.hub_model_id,
            revision=revision,
            tags=tags,
            license=license,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ) -> str | None:
        """Save the model and its card, then upload the folder in one commit through `sophon_hf.hub.push_folder`.

        Uploads safetensors weights, configs, the card, and `report.json` with its plots when present; never pickle
        files. The repo id and the token are checked before anything is saved; a failed upload leaves every local
        file in place; rerun to continue. A run that diverged (`trainer.diverged`) is refused. `kwargs` go to
        [`~SophonTrainer.create_model_card`] (e.g. `license="apache-2.0"`, `dataset_name=[...]`), as with Trainer.
        """
        from .hub import check_repo_id, push_folder, require_token, resolve_repo_id

        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        if self.diverged:
            raise RuntimeError(
                f"Not pushing: protection diverged ({self.stop_reason}). The weights it stopped at are no finished "
                "protection; `trainer.save_model()` keeps them locally. Train again with that fix, then push."
            )
        if self.is_world_process_zero():
            # A push that cannot happen should not first overwrite the output folder's weights and card.
            check_repo_id(repo_id)
            require_token(token or self.args.hub_token, f"Nothing was saved to {self.args.output_dir}.")
        # `_internal_call`: with `args.push_to_hub`, a plain `save_model()` calls `push_to_hub` again.
        self.save_model(_internal_call=True)
        # The card names the repo it is published in, namespace included (and takes the caller's card options).
        repo_id = resolve_repo_id(repo_id, token or self.args.hub_token) if self.is_world_process_zero() else repo_id
        revision = revision if revision is not None else self.args.hub_revision
        self.create_model_card(repo_id=repo_id, revision=revision, **kwargs)
        if not self.is_world_process_zero():
            return None
        return push_folder(
            self.args.output_dir,
            repo_id,
            private=bool(private if private is not None else self.args.hub_private_repo),
            revision=revision,
            token=token or self.args.hub_token,
            commit_message=commit_message,
        )

    def train(self, *args, **kwargs):
        # The only addition to Trainer's: a new run (e.g. retried with a lower step size) starts without the stop of an
        # earlier one on the same trainer, which would refuse its push and mark its card.
        self.stop_reason, self.diverged, self.stopped_at = None, False, None
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # A diverged run is saved (nothing is lost) but never pushed: skip Trainer's push on save (`push_to_hub=True`).
        super().save_model(output_dir, _internal_call=_internal_call or self.diverged)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Intermediate uploads would bypass the single push_folder path (and publish unmeasured weights);
        # `trainer.push_to_hub()` publishes the final model.
        return

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not os.path.isdir(resume_from_checkpoint):
            # from_pretrained would read a missing path as a Hub repo id and blame the safetensors setting.
            raise FileNotFoundError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} is not a checkpoint folder. Pass a "
                f"`checkpoint-N` folder of {self.args.output_dir}, or resume_from_checkpoint=True for the latest."
            )
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(module, PreTrainedModel):
            # Through from_pretrained: transformers 5 saves some architectures (e.g. ViT) under their legacy key
            # names and only from_pretrained maps them back; Trainer's raw state-dict load would silently skip them.
            # use_safetensors: a checkpoint holding only pickle weights fails here instead of being unpickled.
            try:
                reloaded = type(module).from_pretrained(
                    resume_from_checkpoint, config=module.config, use_safetensors=True
                )
            except OSError as error:
                raise OSError(f"{error}{pickle_weights_hint(resume_from_checkpoint)}") from error
            module.load_state_dict(reloaded.state_dict())
            return
        if not is_diffusers_model(module):
            from transformers.utils import SAFE_WEIGHTS_NAME

            # Trainer would fall back to a pickled `pytorch_model.bin`: sophon_hf loads weights from safetensors only.
            if not os.path.isfile(os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)):
                raise FileNotFoundError(
                    f"{resume_from_checkpoint} has no {SAFE_WEIGHTS_NAME}."
                    + (pickle_weights_hint(resume_from_checkpoint) or " Not a checkpoint written by SophonTrainer.")
                )
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        path = os.path.join(resume_from_checkpoint, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: not a checkpoint of a Diffusers model written by SophonTrainer."
            )
        module.load_state_dict(safetensors.torch.load_file(path, device="cpu"))

    def _load_best_model(self) -> None:
        # `load_best_model_at_end`: the same loading path as resuming (Trainer's raw state-dict load would skip ViT's
        # legacy key names and does not know Diffusers folders).
        logger.info("Loading the best model from %s.", self.state.best_model_checkpoint)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _remove_unused_columns(self, dataset, description: str | None = None):
        # Every dataset is already reduced to the model's inputs and labels (`task.prepare_dataset`); Trainer's
        # signature-based removal would drop `labels` for plain modules whose forward takes only the inputs.
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        return data_collator

    def hyperparameter_search(self, *args, **kwargs):
        raise NotImplementedError(
            "SophonTrainer does not support hyperparameter_search: Trainer's search re-creates the model through "
            "`model_init`, while SophonTrainer derives its task, head and simulated LoRA attacker from the model it is "
            "given. Run one SophonTrainer per configuration instead."
        )

    # ------------------------------------------------------------------ one outer iteration
    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch=None):
        # Checkpoints record the user's batch size, not the ntr_steps-fold batch an outer iteration reads: Trainer
        # compares it with `per_device_train_batch_size` on resume and warns of a mismatch otherwise.
        self.state.train_batch_size = self.args.train_batch_size
        model.train()
        inputs = self._prepare_inputs(inputs)
        # Mixed precision (bf16/fp16 autocast) applies to the simulation and normal training alike.
        with self.compute_loss_context_manager():
            return self._outer_iteration(model, inputs)

    def _outer_iteration(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self._fine_tuning_simulation_step():
            return torch.zeros((), device=self.args.device)
        # Normal training reinforcement: ntr_steps steps, the last one stepped by Trainer's own loop.
        chunks = [{k: v[i :: self.args.ntr_steps] for k, v in inputs.items()} for i in range(self.args.ntr_steps)]
        # The last batch of an epoch can hold fewer rows than there are NTR steps: skip the empty chunks.
        chunks = [chunk for chunk in chunks if len(next(iter(chunk.values())))]
        # Diffusion noise and timesteps come from a stream of this rank's own (the global RNG is seeded alike on every
        # rank, which would give every rank the same noise), replayed exactly on resume.
        generator = self._generator(salt=1)
        losses = []
        for chunk in chunks[:-1]:
            loss = self._ntr_loss(model, chunk, generator)
            if loss is None:
                return torch.zeros((), device=self.args.device)
            losses.append(loss.detach())
            self.accelerator.backward(loss)
            if self.args.max_grad_norm:
                self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        loss = self._ntr_loss(model, chunks[-1], generator)
        if loss is None:
            return torch.zeros((), device=self.args.device)
        self.accelerator.backward(loss)
        # Trainer logs this as `loss`: the mean over the outer iteration's normal-training steps, not the last one's.
        return torch.stack([*losses, loss.detach()]).mean()

    def _ntr_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor | None:
        smoothing = {"label_smoothing": self.args.label_smoothing_factor} if self.args.label_smoothing_factor else {}
        loss, _ = self.task.loss(model, batch, generator=generator, **smoothing)
        finite = torch.isfinite(loss.detach()).float()
        if self.args.world_size > 1:
            # Every rank must take the same decision: a rank that skipped its backward would leave the others
            # blocked in DDP's gradient all-reduce.
            finite = self.accelerator.reduce(finite, reduction="sum") / self.args.world_size
        if finite.item() < 1:
            self._check_data([batch], "train_dataset")
            # Normal training's own step or the suppression step just before it can have moved the weights too far.
            self._stop("the normal-training loss became non-finite; lower learning_rate or fts_learning_rate", True)
            return None
        self._metrics["ntr/loss"].append(loss.item())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.task.loss(model, inputs)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            if getattr(self.task, "label_column", None) and self.task.label_column not in inputs:
                return None, self.task.forward(model, inputs).detach(), None  # `predict` on unlabelled data
            # Denoising losses draw noise and timesteps: seeded per image, so that evaluations (and
            # `metric_for_best_model`) compare weights, not noise, whatever the batch size. (Under several processes
            # Trainer's sampler repeats a few images to even out the shards, as for any Trainer evaluation loss.)
            loss, outputs = self.task.loss(model, inputs, generator=self.args.seed)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs.detach(), inputs.get("labels")

    def _prepare_user_dataset(self, dataset, role: str, labels_required: bool = True):
        # Datasets passed to `evaluate`/`predict` get the same column checks and selection as the constructor's.
        if dataset is None or not hasattr(dataset, "column_names"):
            return dataset
        label_column = getattr(self.task, "label_column", None)
        if not labels_required and label_column and label_column not in dataset.column_names:
            names = [n for n in self.task.input_names if n in dataset.column_names]
            if not names:
                raise ValueError(f"`{role}` has none of the model's input columns {list(self.task.input_names)}.")
            return dataset.with_format("torch", columns=names)
        return self.task.prepare_dataset(dataset, role)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        test_dataset = self._prepare_user_dataset(test_dataset, "test_dataset", labels_required=False)
        return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    # ------------------------------------------------------------------ fine-tuning simulation
    def _generator(self, salt: int) -> torch.Generator:
        # A stateless stream per (seed, outer step, rank): resuming from a checkpoint replays the same attackers
        # and the same restricted batches as an uninterrupted run.
        seed = (self.args.seed * 1_000_003 + self.state.global_step) * 1_009 + self.args.process_index
        return torch.Generator().manual_seed(seed * 7 + salt)

    def _restricted_rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        # Indexing a `datasets.Dataset` converts Arrow rows one by one (tens of ms per batch of images): a restricted
        # set that fits in memory is turned into tensors once, larger ones are read per outer iteration.
        if self._restricted_tensors is None:
            first = self.restricted_dataset[:1]
            size = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
            fits = all(isinstance(v, torch.Tensor) for v in first.values())
            fits = fits and size * len(self.restricted_dataset) <= RESTRICTED_IN_MEMORY_BYTES
            self._restricted_tensors = self.restricted_dataset[:] if fits else {}
            if any(not isinstance(v, torch.Tensor) for v in self._restricted_tensors.values()):
                self._restricted_tensors = {}  # ragged columns: keep reading through the dataset
        if not self._restricted_tensors:
            return self.restricted_dataset[indices]
        return {k: v[indices] for k, v in self._restricted_tensors.items()}

    def _restricted_batches(
        self, generator: torch.Generator, support_pool: torch.Tensor | None = None
    ) -> tuple[list[dict], list[dict]]:
        """Support and query batches for each inner step, from this rank's shard of the restricted data.

        With `support_pool` (an attacker with few examples) support batches come from the pool and query batches
        from the rest of the shard, so the suppression loss measures what the attacker's fine-tune generalises to.
        """
        shard = torch.arange(self.args.process_index, len(self.restricted_dataset), self.args.world_size)
        size, half = self.restricted_batch_size, self.restricted_batch_size // 2

        def draw(pool: torch.Tensor, count: int) -> torch.Tensor:
            if len(pool) >= count:
                return pool[torch.randperm(len(pool), generator=generator)[:count]]
            return pool[torch.randint(len(pool), (count,), generator=generator)]  # tiny pool: with replacement

        if support_pool is None:
            indices = [draw(shard, size) for _ in range(self.args.inner_steps)]
        else:
            held_out = shard[~torch.isin(shard, support_pool)]
            indices = [
                torch.cat([draw(support_pool, half), draw(held_out, size - half)])
                for _ in range(self.args.inner_steps)
            ]
        rows = {k: v.to(self.args.device) for k, v in self._restricted_rows(torch.cat(indices)).items()}
        supports, queries = [], []
        for step in range(self.args.inner_steps):
            start = step * size
            supports.append({k: v[start : start + half] for k, v in rows.items()})
            queries.append({k: v[start + half : start + size] for k, v in rows.items()})
        return supports, queries

    def _simulation_view(self, module: nn.Module, strategy: str, generator: torch.Generator) -> SimulationView:
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        # Buffers are copies: BatchNorm statistics of restricted data are thrown away with the simulation.
        frozen = {n: b.clone() for n, b in module.named_buffers()}
        frozen.update({n: p for n, p in module.named_parameters() if not p.requires_grad})
        head = set(self.task.head_param_names or ())
        body = {n: p for n, p in params.items() if n not in head}
        if strategy == "full":
            return SimulationView(module, params, frozen, {n: n for n in params})
        if strategy in ("full_reinit_head", "linear_probe"):
            fresh = {k: v.to(self.args.device) for k, v in self.task.fresh_head(module, generator).items()}
            if strategy == "full_reinit_head":
                return SimulationView(module, {**body, **fresh}, frozen, {n: n for n in body})
            return SimulationView(module, fresh, {**frozen, **body}, {n: n for n in body})
        lora_model, base_map, adapters = self._lora
        own = {**dict(module.named_parameters()), **frozen}
        # The real LoRA attack trains the released head along with the adapters (as PEFT's `modules_to_save` does for
        # a classifier): so does the simulated one, and the head's meta-gradient is taken at each adapted point.
        lora_head = {peft_name for peft_name, name in base_map.items() if name in head and name in params}
        lora_frozen = {peft_name: own[name] for peft_name, name in base_map.items() if peft_name not in lora_head}
        adapted = fresh_lora_weights(lora_model, adapters, generator, self.args.device)
        adapted.update({peft_name: params[base_map[peft_name]] for peft_name in lora_head})
        to_model = {peft_name: name for peft_name, name in base_map.items() if name in params}
        return SimulationView(lora_model, adapted, lora_frozen, to_model)

    def _fine_tuning_simulation_step(self) -> bool:
        """Simulate an attacker, then take one suppression step. Returns False when training must stop."""
        args = self.args
        module = self.accelerator.unwrap_model(self.model)
        generator = self._generator(salt=0)
        attacker = self._attacker
        if attacker is None or attacker.steps >= (args.simulation_horizon or args.inner_steps):
            strategy = args.simulation_strategies[
                torch.randint(len(args.simulation_strategies), (), generator=generator)
            ]
            spec = args.inner_optimizers[torch.randint(len(args.inner_optimizers), (), generator=generator)]
            optimizer = parse_inner_optimizer(spec, args.inner_learning_rate)
            attacker = _PersistentAttacker(strategy, f"{optimizer.name}:{optimizer.lr}", optimizer)
            if args.simulation_support_size:
                shard = torch.arange(args.process_index, len(self.restricted_dataset), args.world_size)
                attacker.support_pool = shard[
                    torch.randperm(len(shard), generator=generator)[: args.simulation_support_size]
                ]
        strategy, spec = attacker.strategy, attacker.spec
        view = self._simulation_view(module, strategy, generator)
        if attacker.steps:
            # A persistent attacker resumes where it stopped: its offset from the (since updated) model weights, its
            # own fresh head or adapters, and its optimizer state.
            # (A LoRA attacker checkpointed before simulated LoRA attackers trained the head has no offset for it: its
            # head resumes from the model's.)
            view.adapted = {
                n: t.detach() + attacker.offsets.get(n, 0) if n in view.to_model else attacker.own[n]
                for n, t in view.adapted.items()
            }
        supports, queries = self._restricted_batches(generator, attacker.support_pool)

        def suppression(m, batch, params):
            if not args.feature_suppression_weight:
                return self.task.suppression_loss(args.restricted_loss, m, batch, params, generator=generator)
            features = []
            head = m.get_submodule(self.task.head_name if m is module else f"base_model.model.{self.task.head_name}")
            handle = head.register_forward_pre_hook(lambda _, inputs: features.append(inputs[0]))
            try:
                loss, outputs = self.task.suppression_loss(args.restricted_loss, m, batch, params, generator=generator)
            finally:
                handle.remove()
            return loss + args.feature_suppression_weight * features[0].pow(2).mean(), outputs

        def task_loss(m, batch, params):
            return self.task.loss(m, batch, params, generator=generator)

        # A real linear probe runs the frozen body in eval mode (BatchNorm running statistics, no dropout; see
        # `attacks.run_attack`): the simulated one must see the same features. The buffers are copies either way.
        if strategy == "linear_probe":
            module.eval()
        # A real LoRA attack trains in train mode (`attacks.run_attack`); the PEFT copy keeps the mode the model had
        # when it was built (eval mode after `from_pretrained`).
        if strategy == "lora":
            view.module.train()
        try:
            checkpointing_off = _without_activation_checkpointing(module, *([self._lora[0]] if self._lora else []))
            with checkpointing_off:
                result = simulate_finetuning(
                    view,
                    task_loss,
                    suppression,
                    self.task.batch_metric,
                    attacker.optimizer,
                    supports,
                    queries,
                    first_order=args.first_order,
                )
        finally:
            module.train()
        if args.simulation_horizon or args.simulation_support_size:
            attacker.steps += args.inner_steps
            attacker.offsets = {
                n: w - module.get_parameter(view.to_model[n]).detach()
                for n, w in result.final_weights.items()
                if n in view.to_model
            }
            attacker.own = {n: w for n, w in result.final_weights.items() if n not in view.to_model}
            self._attacker = attacker

        # Average the meta-gradient over ranks explicitly: the simulation ran outside DDP's forward.
        params = [p for p in module.parameters() if p.requires_grad]
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        flat = torch.cat([result.meta_grads.get(n, torch.zeros_like(p)).reshape(-1) for n, p in zip(names, params)])
        if args.world_size > 1:
            flat = self.accelerator.reduce(flat, reduction="mean")
        if not torch.isfinite(flat).all():
            self._check_data([*supports, *queries], "restricted_dataset")
            self._stop(
                f"the suppression meta-gradient became non-finite (strategy {strategy}, inner optimizer {spec}); "
                f"lower that simulated attacker's step size ({spec} in inner_optimizers, or inner_learning_rate), "
                "fts_learning_rate or learning_rate",
                diverged=True,
            )
            return False
        grad_norm = flat.norm()
        if args.fts_max_grad_norm:
            flat = flat * torch.clamp(args.fts_max_grad_norm / (grad_norm + 1e-6), max=1.0)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        fts_optimizer = self._get_fts_optimizer()
        if args.fts_follows_lr_schedule and self.lr_scheduler is not None:
            # The suppression step decays (or warms up) with normal training, so their balance stays the same to
            # the end; otherwise a decaying `learning_rate` leaves the last iterations to suppression alone.
            # Relative to the schedule's own base rate: a user-supplied optimizer's rate need not be learning_rate.
            base = getattr(self.lr_scheduler, "base_lrs", [args.learning_rate])[0]
            factor = self.lr_scheduler.get_last_lr()[0] / base if base else 1.0
            for group in fts_optimizer.param_groups:
                group["lr"] = args.fts_learning_rate * factor
        fts_optimizer.step()
        self.fts_optimizer.zero_grad(set_to_none=True)

        self._metrics["fts/query_loss"].append(float(np.mean(result.query_losses)))
        self._metrics["fts/final_query_loss"].append(result.query_losses[-1])
        self._metrics["fts/support_loss"].append(float(np.mean(result.support_losses)))
        metric_name = getattr(self.task, "batch_metric_name", self.task.metric_name)
        self._metrics[f"fts/query_{metric_name}"].append(result.query_metric)
        self._metrics["fts/grad_norm"].append(grad_norm.item())
        return True

    # ------------------------------------------------------------------ stopping, logging, evaluation
    def _check_data(self, batches: list[dict[str, torch.Tensor]], role: str) -> None:
        """After a non-finite loss (every rank calls this together): NaN or infinite values in the data are the
        user's to fix, not a step size to lower, on whichever rank they are."""
        bad = [batch for batch in batches if non_finite_columns(batch)]
        flag = torch.tensor(float(bool(bad)), device=self.args.device)
        if self.args.world_size > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if bad:
            check_finite(bad[0], role)  # raises, naming the column
        if flag.item() > 0:
            raise ValueError(
                f"`{role}` has NaN or infinite values in rows another process read; clean or drop those rows first."
            )

    def _stop(self, reason: str, diverged: bool = False) -> None:
        if self.diverged:  # a later stop (e.g. the floor at the final evaluation) must not hide a divergence
            reason = f"{self.stop_reason}; then {reason}"
        else:
            self.stopped_at = self.state.global_step  # outer iterations completed
        self.stop_reason = reason
        self.diverged = self.diverged or diverged
        self.control.should_training_stop = True
        logger.error("SOPHON training stopped at outer iteration %d: %s.", self.state.global_step, reason)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Only Trainer's periodic training logs (they carry `loss`) take the fts/ntr means: not evaluation logs, and not
        # the end-of-training summary, whose `train_loss` covers the whole run while these would cover its last steps.
        if "loss" in logs:
            means = {k: float(np.mean(v)) for k, v in self._metrics.items() if v}
            if self.args.world_size > 1:
                # Every rank simulates its own attackers: log the mean over ranks, not rank 0's alone. Trainer calls
                # `log` on every rank at the same step, so this gather is matched.
                from accelerate.utils import gather_object

                parts = gather_object([means])
                means = {k: float(np.mean([p[k] for p in parts if k in p])) for k in {k for p in parts for k in p}}
            logs = {**logs, **means}
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_user_dataset(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_user_dataset(eval_dataset, "eval_dataset")
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        floor = self.args.original_accuracy_floor
        key = f"{metric_key_prefix}_original_{self.task.metric_name}"
        if (
            floor is not None
            and key not in metrics
            and any(k.startswith(f"{metric_key_prefix}_original_") for k in metrics)
        ):
            # The original split was evaluated, but by a `compute_metrics` without accuracy: the guard cannot run.
            prefix = f"{metric_key_prefix}_original_"
            trainer_own = {"loss", "runtime", "samples_per_second", "steps_per_second"}
            returned = sorted(
                k[len(prefix) :] for k in metrics if k.startswith(prefix) and k[len(prefix) :] not in trainer_own
            )
            raise ValueError(
                f"original_accuracy_floor reads `{key}`, but compute_metrics returned {returned}: make it return "
                f"'{self.task.metric_name}' too, or leave compute_metrics unset (SophonTrainer then computes it)."
            )
        if floor is None or key not in metrics:
            return metrics
        module = self.accelerator.unwrap_model(self.model)
        if metrics[key] >= floor:
            self._best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            if self._best_state is not None:
                module.load_state_dict(self._best_state)
            self._stop(
                f"original-domain {self.task.metric_name} {metrics[key]:.4f} fell below original_accuracy_floor="
                f"{floor}; restored the weights of the last evaluation that met it"
                if self._best_state is not None
                else f"original-domain {self.task.metric_name} {metrics[key]:.4f} is below original_accuracy_floor="
                f"{floor} (no earlier evaluation met it, the weights are kept as they are)"
            )
        return metrics

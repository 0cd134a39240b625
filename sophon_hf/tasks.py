"""What differs between kinds of model: inputs, task loss, suppression loss, head, metric.

The trainer, the simulation and the attack harness only talk to a model through a task object, so a new kind
of model (diffusion UNets, causal LMs) is a new task class, not a change to those modules.

Every method that runs the model takes an optional `params` mapping (parameter and buffer names as in
`named_parameters()` / `named_buffers()`, to tensors). When given, the model runs through
`torch.func.functional_call` with those tensors in place of its own (missing names fall back to the module's
own tensors), which is how the simulated attacker's fast weights are evaluated without touching the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .losses import classification_suppression_loss

IMAGE_INPUTS = ("pixel_values",)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def non_finite_columns(columns: Mapping[str, torch.Tensor]) -> list[str]:
    """The float columns of `columns` (a batch, or a whole dataset's columns) that hold NaN or infinite values."""
    return [
        name
        for name, values in columns.items()
        if isinstance(values, torch.Tensor) and values.is_floating_point() and not torch.isfinite(values).all()
    ]


def check_finite(columns: Mapping[str, torch.Tensor], role: str) -> None:
    """Refuse NaN or infinite values in the float columns of `columns` (a batch, or a whole dataset's columns).

    Such values make every loss non-finite: without this check they would be reported as a diverging optimizer.
    """
    bad = non_finite_columns(columns)
    if bad:
        name, values = bad[0], columns[bad[0]]
        rows = (~torch.isfinite(values)).reshape(len(values), -1).any(1).sum().item()
        raise ValueError(
            f"`{role}` has NaN or infinite values in '{name}' ({rows} of the rows checked). Clean or drop those rows "
            f"first, e.g. `{role}.filter(lambda row: np.isfinite(row['{name}']).all())`."
        )


def check_not_empty(dataset, role: str) -> None:
    """Clear errors for a missing or empty dataset, or one that is not a `datasets.Dataset` (`role` names it)."""
    if dataset is None:
        raise ValueError(f"`{role}` is required.")
    if isinstance(dataset, dict) and all(hasattr(v, "column_names") for v in dataset.values()):
        raise ValueError(
            f"`{role}` is a DatasetDict with splits {list(dataset)} (what `load_dataset` returns without `split=`): "
            f"pass one split, e.g. `{role}['{next(iter(dataset), 'train')}']`."
        )
    if not hasattr(dataset, "column_names"):
        raise ValueError(
            f"`{role}` is a {type(dataset).__name__}, not a `datasets.Dataset`: build one with "
            "`datasets.Dataset.from_dict({'pixel_values': ..., 'labels': ...})`."
        )
    if getattr(dataset, "format", {}).get("type") == "custom":
        raise ValueError(
            f"`{role}` has an on-the-fly transform (`with_transform` / `set_transform`), whose output columns cannot "
            "be read as tensors here: apply it once with `dataset.map(transform, batched=True, remove_columns=[...])`."
        )
    if len(dataset) == 0:
        raise ValueError(f"`{role}` is empty: it needs at least one example.")


def check_label_column(dataset, column: str, role: str) -> None:
    """A clear error for string labels (torch cannot stack them): say how to turn them into class ids."""
    feature = getattr(dataset, "features", {}).get(column)
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        raise ValueError(
            f"`{role}` has string labels in '{column}'; classification needs integer class ids. Encode them with "
            f"`{role} = {role}.class_encode_column('{column}')` (use the same label order for every dataset)."
        )


def find_classification_head(model: nn.Module, head_name: str | None = None) -> str:
    """Return the dotted module name of a classifier's output layer (an `nn.Linear`).

    Transformers classifiers and plain modules alike: the last `nn.Linear` in `named_modules()` order whose
    output size is the number of labels (`config.num_labels` when the model has a config), else the last
    `nn.Linear`. Pass `head_name` to override (e.g. `"classifier.1"` for a ResNet).
    """
    modules = dict(model.named_modules())
    if head_name is not None:
        if head_name not in modules:
            raise ValueError(
                f"head_name={head_name!r} is not a module of {type(model).__name__}. Some module names: "
                f"{[n for n, m in modules.items() if isinstance(m, nn.Linear)][-5:]}"
            )
        if not isinstance(modules[head_name], nn.Linear):
            raise ValueError(f"head_name={head_name!r} names a {type(modules[head_name]).__name__}, not an nn.Linear.")
        return head_name
    linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so it is not a classifier sophon_hf can protect. "
            "Pass a classifier (e.g. AutoModelForImageClassification) or set `head_name`."
        )
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None:
        matching = [name for name in linears if modules[name].out_features == num_labels]
        if matching:
            return matching[-1]
    return linears[-1]


def check_is_classifier(model: nn.Module) -> None:
    """Raise a clear error for Transformers models that do not classify whole inputs (e.g. a bare `BertModel`)."""
    name = type(model).__name__
    # Token classification (one label per token: NER, POS tagging) has 3-D logits that the losses here do not take.
    if _is_transformers_model(model) and "TokenClassification" in name:
        raise ValueError(
            f"{name} classifies every token; SophonTrainer protects classifiers of whole inputs (one label per "
            "example). Load the model with `AutoModelForSequenceClassification` or `AutoModelForImageClassification`."
        )
    if _is_transformers_model(model) and "Classification" not in name:
        raise ValueError(
            f"{name} is not a classifier. Load the model with a classification head, e.g. "
            "`AutoModelForImageClassification` or `AutoModelForSequenceClassification`, or pass a Diffusers "
            "UNet2DModel with a `noise_scheduler` for diffusion."
        )


class ClassificationTask:
    """Image or text classification with a linear output head.

    Args:
        model (`nn.Module`):
            A Transformers `*ForImageClassification` / `*ForSequenceClassification` model, or a plain module whose
            forward takes the input tensor(s) positionally and returns logits.
        head_name (`str`, *optional*):
            Dotted name of the output `nn.Linear`; found automatically when omitted.
    """

    metric_name = "accuracy"
    higher_is_better = True
    label_column = "labels"

    def __init__(self, model: nn.Module, head_name: str | None = None):
        check_is_classifier(model)
        self.is_transformers = _is_transformers_model(model)
        self.head_name = find_classification_head(model, head_name)
        head = model.get_submodule(self.head_name)
        self.num_labels = head.out_features
        self.head_param_names = [f"{self.head_name}.{n}" for n, _ in head.named_parameters()]
        self.input_names: tuple[str, ...] = ()
        self._inputs_role = "the first dataset"  # the dataset whose columns fixed `input_names`, for error messages
        self.name = "classification"
        self.model_class = type(model).__name__
        # What the model can take, so that data it cannot gets a clear error here rather than deep inside its forward.
        self.main_input_name = getattr(model, "main_input_name", None) if self.is_transformers else None
        embeddings = None
        if self.main_input_name == "input_ids":
            with contextlib.suppress(NotImplementedError, AttributeError):  # models without a token embedding
                embeddings = model.get_input_embeddings()
        self.vocab_size = embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else None
        self.max_length = None  # learned absolute positions only (rotary or relative ones have no fixed limit)
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and module_name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
                # RoBERTa-style embeddings count positions from padding_idx + 1.
                offset = module.padding_idx + 1 if module.padding_idx is not None else 0
                self.max_length = module.num_embeddings - offset
                break
        config = getattr(model, "config", None)
        # Decoder classifiers (GPT-2, LLaMA) read the last non-pad token, which never attends to later padding: only
        # bidirectional encoders need an attention mask over padded ids.
        self.pad_token_id = None if _is_causal(config) else getattr(config, "pad_token_id", None)

    # ------------------------------------------------------------------ data
    def prepare_dataset(self, dataset, role: str = "dataset"):
        """Check a dataset's columns and labels, and return it in torch format with only the needed columns.

        Args:
            dataset (`datasets.Dataset`): rows with `pixel_values` (images) or `input_ids` (text) and `labels`.
            role (`str`): how the dataset is named in error messages, e.g. `"restricted_dataset"`.
        """
        check_not_empty(dataset, role)
        columns = set(dataset.column_names)
        if "labels" not in columns:
            hint = (
                f" It has a 'label' column: use `{role}.rename_column('label', 'labels')` (on the command line: "
                "`--label-column label`)."
                if "label" in columns
                else ""
            )
            raise ValueError(f"`{role}` has no 'labels' column (columns: {sorted(columns)}).{hint}")
        if "pixel_values" in columns:
            names, name = IMAGE_INPUTS, "image-classification"
        elif "input_ids" in columns:
            names, name = tuple(n for n in TEXT_INPUTS if n in columns), "text-classification"
        else:
            hint = (
                " Map raw images to 'pixel_values' with the model's image processor first "
                "(`dataset.map(lambda b: processor(b['image']), batched=True, remove_columns=['image'])`)."
                if {"image", "img"} & columns
                else " Tokenize text into 'input_ids' first, e.g. `sophon_hf.data.to_model_inputs(dataset, tokenizer)`."
                if {"text", "sentence"} & columns
                else ""
            )
            raise ValueError(
                f"`{role}` has neither 'pixel_values' (images) nor 'input_ids' (text) (columns: {sorted(columns)})."
                + hint
            )
        if self.main_input_name in ("pixel_values", "input_ids") and names[0] != self.main_input_name:
            raise ValueError(
                f"`{role}` holds {name} data ('{names[0]}') but {self.model_class} takes '{self.main_input_name}'. "
                "Pass data of the model's kind, or a model for this data."
            )
        if self.input_names and names[0] != self.input_names[0]:
            raise ValueError(f"`{role}` holds {name} data but the other datasets hold {self.name} data.")
        if self.input_names:
            # The first dataset fixes the model inputs: a later one without e.g. `attention_mask` must not silently
            # drop it from every batch, nor lose one the first dataset lacked.
            missing = [n for n in self.input_names if n not in names]
            if missing:
                raise ValueError(
                    f"`{role}` has no {missing} column(s) but `{self._inputs_role}` does; tokenize every dataset the "
                    "same way (e.g. with `return_attention_mask=True`)."
                )
            extra = [n for n in names if n not in self.input_names]
            if extra:
                raise ValueError(
                    f"`{role}` has {extra} column(s) that `{self._inputs_role}` lacks; tokenize every dataset the same "
                    "way (e.g. with `return_attention_mask=True`)."
                )
        else:
            self._inputs_role = role
        self.input_names, self.name = names, name
        check_label_column(dataset, "labels", role)
        dataset = dataset.with_format("torch", columns=[*names, "labels"])
        if name == "image-classification":
            sample = dataset[:1]["pixel_values"]
            if isinstance(sample, torch.Tensor) and not sample.dtype.is_floating_point:
                dtype = str(sample.dtype).removeprefix("torch.")
                raise ValueError(
                    f"`{role}` has {dtype} 'pixel_values' (raw images, 0-255?), but models take float pixel values "
                    "prepared by their image processor (rescaled, normalised). Apply it first, e.g. "
                    "`dataset.map(lambda b: processor(b['pixel_values']), batched=True)`."
                )
        ids = dataset[:]["input_ids"] if name == "text-classification" else None
        if name == "text-classification" and not isinstance(ids, torch.Tensor):
            raise ValueError(
                f"`{role}` has 'input_ids' of different lengths. Pad every example to one length when tokenizing, "
                "e.g. `tokenizer(texts, padding='max_length', truncation=True, max_length=128)`."
            )
        if ids is not None and self.vocab_size is not None and (ids.numel() and int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"`{role}` has token ids up to {int(ids.max())} but {self.model_class} has a vocabulary of "
                f"{self.vocab_size}: tokenize with the model's own tokenizer."
            )
        if ids is not None and self.max_length is not None and ids.shape[-1] > self.max_length:
            raise ValueError(
                f"`{role}` has sequences of {ids.shape[-1]} tokens but {self.model_class} takes at most "
                f"{self.max_length}: tokenize with `truncation=True, max_length={self.max_length}` (or less)."
            )
        if (
            name == "text-classification"
            and "attention_mask" not in names
            and self.pad_token_id is not None
            and bool((ids == self.pad_token_id).any())
        ):
            # Without a mask the model attends to padding, so results depend on how far each example was padded.
            raise ValueError(
                f"`{role}` has padded 'input_ids' (pad token id {self.pad_token_id}) but no 'attention_mask'. "
                "Tokenize with `return_attention_mask=True` (the default of `tokenizer(...)`) and keep the column."
            )
        # The label column alone, in one read (a torch-formatted column is read row by row: 16 s for 200k rows).
        labels = torch.as_tensor(dataset.with_format("numpy", columns=["labels"])[:]["labels"])
        if labels.dtype.is_floating_point:
            raise ValueError(f"`{role}` has float labels; classification needs integer class ids.")
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise ValueError(
                f"`{role}` has negative label ids (smallest {low}): -1 or -100 mark unlabelled examples (e.g. the test "
                "splits of GLUE), which cannot train or score a classifier. Keep the labelled rows, e.g. "
                f"`{role}.filter(lambda row: row['labels'] >= 0)`, or use a split that has labels."
            )
        if high >= self.num_labels:
            raise ValueError(
                f"`{role}` has label ids in [{low}, {high}] but the head `{self.head_name}` has {self.num_labels} "
                f"outputs. Remap the labels to 0..{self.num_labels - 1} or give the model a head with "
                f"{high + 1} outputs (e.g. `num_labels={high + 1}` when loading it)."
            )
        return dataset

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs in `batch`: the prepared datasets' input columns (every non-label key before that)."""
        if not self.input_names:
            return {name: value for name, value in batch.items() if name != self.label_column}
        return {name: batch[name] for name in self.input_names if name in batch}

    # ------------------------------------------------------------------ model calls
    def forward(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits of `model` on `batch`, optionally with `params` substituted functionally."""
        inputs = self.model_inputs(batch)
        args, kwargs = ((), inputs) if self.is_transformers else (tuple(inputs.values()), {})
        out = model(*args, **kwargs) if params is None else functional_call(model, dict(params), args, kwargs)
        return out.logits if hasattr(out, "logits") else out

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | int | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ordinary task loss (cross-entropy, optionally label-smoothed) and the logits: what normal training and
        attackers minimise. `generator` is unused (nothing is random here); it keeps the diffusion task's signature."""
        logits = self.forward(model, batch, params)
        return F.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing), logits

    def suppression_loss(
        self,
        loss_name: str,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The suppression loss named `loss_name` (see `sophon_hf.losses`) and the logits."""
        logits = self.forward(model, batch, params)
        return classification_suppression_loss(loss_name, logits, batch["labels"]), logits

    @staticmethod
    def batch_metric(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> float:
        """Accuracy of `logits` on `batch`."""
        return (logits.argmax(-1) == batch["labels"]).float().mean().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset, batch_size: int = 256) -> float:
        """Accuracy of `model` on a prepared dataset, in eval mode (the mode is restored afterwards)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        correct = 0
        for start in range(0, len(dataset), batch_size):
            batch = {k: v.to(device) for k, v in dataset[start : start + batch_size].items()}
            correct += (self.forward(model, batch).argmax(-1) == batch["labels"]).sum().item()
        model.train(was_training)
        return correct / len(dataset)

    # ------------------------------------------------------------------ head
    def fresh_head(self, model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """New head tensors, initialised as a fresh model's head is (what an attacker gets from re-initialising).

        A Transformers model's own `_init_weights` decides (e.g. ViT and BERT: normal with `initializer_range`, zero
        bias, as `from_pretrained(..., num_labels=N, ignore_mismatched_sizes=True)` gives); other modules get
        `nn.Linear`'s default. Drawn from `generator` so that the simulation is reproducible and resumable.
        """
        head = model.get_submodule(self.head_name)
        if _is_transformers_model(model) and hasattr(model, "_init_weights"):
            # One draw from `generator` (on its own device: the harness's is the model's) seeds the CPU stream that
            # builds and initialises the layer, so the head comes from `generator` whatever `_init_weights` skips.
            def build() -> nn.Linear:
                layer = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
                model._init_weights(layer)
                return layer.to(head.weight.dtype)

            if generator is None:
                layer = build()  # the global RNG, as nn.Linear itself
            else:
                seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    layer = build()
            return {f"{self.head_name}.{n}": t.detach().to(head.weight.device) for n, t in layer.named_parameters()}
        weight = torch.empty_like(head.weight)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        fresh = {f"{self.head_name}.weight": weight}
        if head.bias is not None:
            bound = 1 / math.sqrt(head.in_features)
            fresh[f"{self.head_name}.bias"] = torch.empty_like(head.bias).uniform_(-bound, bound, generator=generator)
        return fresh


def is_diffusers_model(model: nn.Module) -> bool:
    """Whether `model` is a Diffusers model (a UNet denoiser here)."""
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, ModelMixin)


def _is_causal(config) -> bool:
    """A decoder-only architecture (GPT-2, LLaMA): causal-LM capable and not a masked-LM encoder (BERT is both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def get_task(
    model: nn.Module,
    head_name: str | None = None,
    noise_scheduler=None,
    diffusion_timestep: int | tuple[int, int] | None = None,
):
    """The task object for `model`: diffusion for Diffusers UNets (with a scheduler), classification otherwise.

    Args:
        model (`nn.Module`): a classifier, or a Diffusers `UNet2DModel` denoiser.
        head_name (`str`, *optional*): classifiers only, the output layer's dotted name.
        noise_scheduler (*optional*): denoisers only (required there), e.g. a `DDPMScheduler`.
        diffusion_timestep (`int` or `tuple[int, int]`, *optional*): denoisers only, a fixed timestep or an
            inclusive range of timesteps for the suppression loss.
    """
    if is_diffusers_model(model):
        if noise_scheduler is None:
            raise ValueError(
                f"{type(model).__name__} is a Diffusers denoiser: pass its noise scheduler, e.g. "
                "`noise_scheduler=DDPMScheduler.from_pretrained(repo_id, subfolder='scheduler')`."
            )
        if head_name is not None:
            raise ValueError(f"head_name={head_name!r} is for classifiers; {type(model).__name__} has no head.")
        from .diffusion import DiffusionTask

        return DiffusionTask(model, noise_scheduler, timestep=diffusion_timestep)
    if hasattr(model, "unet") and hasattr(model, "scheduler") and not isinstance(model, nn.Module):
        raise ValueError(
            f"{type(model).__name__} is a Diffusers pipeline: pass its denoiser and noise schedule, "
            "`model=pipeline.unet, noise_scheduler=pipeline.scheduler`."
        )
    if noise_scheduler is not None:
        raise ValueError(
            f"noise_scheduler is for Diffusers denoisers (UNet2DModel), but {type(model).__name__} is not one; "
            "drop noise_scheduler for classifiers."
        )
    if diffusion_timestep is not None:
        raise ValueError(
            f"diffusion_timestep / diffusion_timestep_range are for Diffusers denoisers, but {type(model).__name__} "
            "is a classifier; leave them unset."
        )
    return ClassificationTask(model, head_name=head_name)

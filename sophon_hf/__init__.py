"""sophon_hf: non-fine-tunable learning (SOPHON) for Hugging Face models, and an honest attack harness."""

from .attacks import AttackSpec, evaluate_finetuning_resistance
from .config import SophonConfig
from .hub import push_folder
from .losses import denial_of_service, inverse_cross_entropy, inverse_cross_entropy_negated_logits, kl_uniform
from .model_card import generate_model_card, write_model_card
from .report import ResistanceReport
from .trainer import SophonTrainer

__version__ = "0.1.0"

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

"""sophon_hf: non-fine-tunable learning (SOPHON) for Hugging Face models, and an honest attack harness."""

from .config import SophonConfig
from .losses import denial_of_service, inverse_cross_entropy, inverse_cross_entropy_negated_logits, kl_uniform
from .trainer import SophonTrainer

__version__ = "0.1.0"

__all__ = [
    "SophonConfig",
    "SophonTrainer",
    "denial_of_service",
    "inverse_cross_entropy",
    "inverse_cross_entropy_negated_logits",
    "kl_uniform",
]

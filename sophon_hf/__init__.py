"""sophon_hf: non-fine-tunable learning (SOPHON) for Hugging Face models, and an honest attack harness."""

__version__ = "0.1.0"

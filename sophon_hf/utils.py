"""Small helpers shared by the trainer, the attack harness and publishing."""

import hashlib

import torch
import torch.nn as nn


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 over the model's parameters and buffers (names, dtypes, shapes and values).

    Reports record it so that a report can never be attached to (or published with) different weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()

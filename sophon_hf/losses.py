"""Suppression losses of SOPHON (Deng et al., IEEE S&P 2024, arXiv 2404.12699).

Plain gradient ascent on the task loss diverges: its gradient grows as it succeeds. The losses below are
minimised by ordinary descent; the paper's inverse cross-entropy and KL from uniform have gradients that vanish once
the restricted task is suppressed, while the released code's negated-logits variant keeps pushing.

Each computes in float32 whatever the input dtype: the difference of two log-sum-exps cancels badly in
bfloat16/float16 (CPU autocast keeps them in bfloat16; a 12% gradient error was measured on 100 classes).
"""

import math

import torch
import torch.nn.functional as F

RESTRICTED_LOSSES = (
    "inverse_cross_entropy",
    "inverse_cross_entropy_negated_logits",
    "kl_uniform",
    "denial_of_service",
)


def inverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Inverse cross-entropy as written in the paper: `-log(1 - p_y)`, averaged over the batch.

    Computed stably as `logsumexp(z) - logsumexp(z with z_y masked to -inf)`. Its gradient vanishes as the
    true class probability goes to zero, so minimising it stops once the restricted task is broken.

    Example:
        >>> inverse_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # -log(1 - 0.5)
        tensor(0.6931)
    """
    logits = logits.float()
    masked = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return (torch.logsumexp(logits, dim=-1) - torch.logsumexp(masked, dim=-1)).mean()


def inverse_cross_entropy_negated_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The variant in the authors' released code: `cross_entropy(-z, y)`.

    It drives the true class to be the *least* likely one and keeps pushing (the gradient does not vanish
    when `p_y` reaches zero), which makes the suppression step larger but less stable.
    """
    return F.cross_entropy(-logits.float(), labels)


def kl_uniform(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL divergence from the uniform distribution to the prediction, `KL(U || p)`, averaged over the batch.

    `KL(U || p) = -(1/C) sum_j log(C p_j)`: zero exactly when the prediction is uniform. Needs no labels.

    Example:
        >>> kl_uniform(torch.zeros(3, 5))
        tensor(0.)
    """
    num_classes = logits.shape[-1]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return (-math.log(num_classes) - log_probs.mean(dim=-1)).mean()


def denial_of_service(predicted_noise: torch.Tensor) -> torch.Tensor:
    """Denial-of-service loss for denoisers: the mean squared predicted noise, `mean(eps_hat ** 2)`.

    Minimising it pushes the network to predict zero noise, so denoising the restricted domain stops working.
    """
    return predicted_noise.float().pow(2).mean()


def classification_suppression_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dispatch to a classification suppression loss by its config name."""
    if name == "inverse_cross_entropy":
        return inverse_cross_entropy(logits, labels)
    if name == "inverse_cross_entropy_negated_logits":
        return inverse_cross_entropy_negated_logits(logits, labels)
    if name == "kl_uniform":
        return kl_uniform(logits)
    raise ValueError(
        f"restricted_loss={name!r} does not apply to classifiers; use one of 'inverse_cross_entropy', "
        "'inverse_cross_entropy_negated_logits' or 'kl_uniform' ('denial_of_service' is for diffusion UNets)."
    )

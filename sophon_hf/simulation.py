"""The fine-tuning simulation: a simulated attacker fine-tunes fast weights functionally (torch.func style).

Fast weights are a plain `dict` keyed like `named_parameters()`; the model runs through
`torch.func.functional_call`, so no module is cloned or patched per step. A *view* says which tensors the
simulated attacker adapts, which it keeps, and which of them are the protected model's own parameters (the
meta-gradient flows back to those only):

- `full`: every parameter adapts, head kept;
- `full_reinit_head`: every parameter adapts, the head starts fresh (its gradient does not reach the model);
- `linear_probe`: a fresh head adapts, the body is frozen (first order: the body's gradient is taken at each adapted
  head, treating the head's updates as constants; `first_order=False` differentiates through them too);
- `lora`: fresh LoRA adapters on a PEFT-wrapped copy adapt with the released head (as the real LoRA attack trains
  them), everything else is frozen.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

SIMULATION_STRATEGIES = ("full", "full_reinit_head", "linear_probe", "lora")
INNER_OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "rmsprop", "adagrad")
# LoRA targets of common architectures, tried in order; the first set whose names all occur in the model wins.
# Diffusers UNets come first with their ResNet blocks' convolutions (`conv1`, `conv2`) as well as the attention
# projections: on a small UNet, adapters on the attention alone hardly fine-tune at all, while with the convolutions
# LoRA fine-tunes like full fine-tuning (RESULTS_diffusion.md, ninth session), and both the harness and the simulated
# attacker should default to the stronger attack. transformers 5 names ViT/CLIP/LLaMA-style attention
# `q_proj`/`v_proj`; BERT-style models keep `query`/`value`; other Diffusers attention uses `to_q`/`to_v`.
LORA_DEFAULT_TARGETS = (
    ("to_q", "to_k", "to_v", "conv1", "conv2"),
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("q_lin", "v_lin"),
    ("to_q", "to_v"),
    ("c_attn",),
    ("qkv",),
)


# ---------------------------------------------------------------------- functional optimizers
def _root(second_moment: torch.Tensor) -> torch.Tensor:
    # The square root's derivative is infinite at 0, and a second moment is exactly 0 wherever every gradient so far
    # was 0 (a dead unit's weights): differentiating through it (second order) would make the meta-gradient NaN.
    # Below 1e-30 the root is under 1e-15, far below the optimizers' eps, so the step itself does not change.
    return second_moment.clamp_min(1e-30).sqrt()


@dataclass
class InnerOptimizer:
    """A differentiable, functional optimizer for the simulated attacker (defaults as in `torch.optim`).

    `step` returns new tensors and never modifies its inputs in place, so the same code serves first-order
    (inputs detached) and second-order (inputs in the graph) meta-gradients.
    """

    name: str
    lr: float
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    alpha: float = 0.99
    eps: float = 1e-8
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    t: int = 0

    def step(self, params: dict[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.t += 1
        new = {}
        for key, p in params.items():
            g, s = grads[key], self.state.setdefault(key, {})
            if self.name == "sgd":
                update = g
            elif self.name == "sgd_momentum":
                s["buf"] = g if "buf" not in s else self.momentum * s["buf"] + g
                update = s["buf"]
            elif self.name == "adam":
                b1, b2 = self.betas
                s["m"] = (1 - b1) * g if "m" not in s else b1 * s["m"] + (1 - b1) * g
                s["v"] = (1 - b2) * g * g if "v" not in s else b2 * s["v"] + (1 - b2) * g * g
                m_hat, v_hat = s["m"] / (1 - b1**self.t), s["v"] / (1 - b2**self.t)
                update = m_hat / (_root(v_hat) + self.eps)
            elif self.name == "rmsprop":
                s["v"] = (1 - self.alpha) * g * g if "v" not in s else self.alpha * s["v"] + (1 - self.alpha) * g * g
                update = g / (_root(s["v"]) + self.eps)
            else:  # adagrad (torch's eps is 1e-10)
                s["v"] = g * g if "v" not in s else s["v"] + g * g
                update = g / (_root(s["v"]) + 1e-10)
            new[key] = p - self.lr * update
        return new


def parse_inner_optimizer(spec: str, default_lr: float) -> InnerOptimizer:
    """Parse `"name"` or `"name:lr"` (e.g. `"adam:1e-3"`) into a fresh `InnerOptimizer`."""
    name, _, lr = spec.partition(":")
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"Unknown inner optimizer {name!r} in {spec!r}; choose from {INNER_OPTIMIZERS}.")
    try:
        value = float(lr) if lr else default_lr
    except ValueError:
        raise ValueError(
            f"Cannot read the learning rate in inner optimizer spec {spec!r}; write e.g. 'adam:1e-3'."
        ) from None
    if not value > 0:
        raise ValueError(f"The learning rate in inner optimizer spec {spec!r} must be positive.")
    return InnerOptimizer(name, value)


# ---------------------------------------------------------------------- LoRA
def default_lora_targets(model: nn.Module, head_name: str | None) -> list[str]:
    """LoRA targets when none are given.

    A Diffusers UNet's attention projections (`to_q`, `to_k`, `to_v`) and ResNet convolutions (`conv1`, `conv2`);
    else the attention query/value projections of common architectures; else every Linear/Conv2d except the head.
    """
    leaf_names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    for targets in LORA_DEFAULT_TARGETS:
        if all(t in leaf_names for t in targets):
            return list(targets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and name != head_name and not name.startswith(f"{head_name}.")
    ]


def check_lora_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Refuse LoRA target names of which any matches no module of `model` (PEFT's rule: a name or a name's suffix).

    PEFT only refuses a list of which nothing matches: one misspelt name among others would silently adapt fewer
    layers than asked for, and a report would name an attack that did not happen.
    """
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not targets or unmatched:
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][:8]
        raise ValueError(
            f"LoRA target modules {unmatched or list(targets)} match no module of {type(model).__name__}. Set "
            f"`lora_target_modules` to names (or name suffixes) of its linear/conv layers, e.g. {layers}."
        )


def peft_model(model: nn.Module, config) -> nn.Module:
    """`peft.get_peft_model`, without the FutureWarning that PEFT's own check of `is_gradient_checkpointing` raises
    under transformers 5 on every call (it says nothing about the caller's code)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def build_lora_copy(
    model: nn.Module, head_name: str | None, r: int, alpha: int, target_modules: Sequence[str] | None = None
) -> tuple[nn.Module, dict[str, str], list[str]]:
    """A PEFT-wrapped copy of `model` for the simulated LoRA attacker.

    Returns the copy, a map from the copy's base tensor names (parameters and buffers) to the model's names, and
    the names of the LoRA adapter parameters. Every tensor of the copy, adapters included, lives on the `meta` device
    and holds no memory: the model's live tensors and fresh adapters (`fresh_lora_weights`) are handed to it
    functionally at every call.
    """
    from peft import LoraConfig

    targets = list(target_modules) if target_modules else default_lora_targets(model, head_name)
    check_lora_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    try:
        lora_model = peft_model(_meta_copy(model), config)
    except ValueError as err:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][:8]
        # The names match (checked above), but PEFT cannot adapt what they name (e.g. a normalisation layer).
        raise ValueError(
            f"PEFT cannot put LoRA adapters on {targets} in {type(model).__name__} ({err}). Set lora_target_modules "
            f"to names of its linear/conv layers, e.g. {linear}."
        ) from None
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    base_map, adapters = {}, []
    for name, _ in [*lora_model.named_parameters(), *lora_model.named_buffers()]:
        if "lora_" in name:
            adapters.append(name)
            continue
        original = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if original not in own:
            raise RuntimeError(f"Cannot map PEFT tensor {name!r} back to the model ({original!r} not found).")
        base_map[name] = original
    return lora_model, base_map, adapters


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are `meta` tensors (no copy of the weights is made)."""
    memo = {}
    for _, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) not in memo:
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def fresh_lora_weights(
    lora_model: nn.Module,
    adapters: Sequence[str],
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
):
    """Fresh adapters on `device`, as PEFT initialises them: A ~ Kaiming-uniform (a=sqrt(5)), B = 0.

    `generator` draws on the CPU (as the rest of the simulation's randomness does); the adapters are moved after.
    """
    params = dict(lora_model.named_parameters())
    fresh = {}
    for name in adapters:
        tensor = torch.empty(params[name].shape, dtype=params[name].dtype)
        if ".lora_A." in name:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        else:
            tensor.zero_()
        fresh[name] = tensor.to(device)
    return fresh


# ---------------------------------------------------------------------- the simulation
@dataclass
class SimulationView:
    """What the simulated attacker runs and adapts.

    Attributes:
        module: the module to call (the model, or its PEFT copy for LoRA).
        adapted: initial fast weights (names of `module`) the attacker fine-tunes.
        frozen: tensors the attacker keeps (names of `module`), buffers included.
        to_model: names (of `module`) whose gradient flows back to a model parameter, mapped to its name.
    """

    module: nn.Module
    adapted: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    to_model: dict[str, str]


@dataclass
class SimulationResult:
    meta_grads: dict[str, torch.Tensor]  # model parameter name -> gradient of the summed suppression loss
    query_losses: list[float]
    support_losses: list[float]
    query_metric: float  # task metric on the query set after the last inner step
    final_weights: dict[str, torch.Tensor]  # the attacker's adapted tensors after the last step, detached


def simulate_finetuning(
    view: SimulationView,
    task_loss: Callable,
    suppression_loss: Callable,
    batch_metric: Callable,
    optimizer: InnerOptimizer,
    support_batches: Sequence[Mapping[str, torch.Tensor]],
    query_batches: Sequence[Mapping[str, torch.Tensor]],
    first_order: bool = True,
) -> SimulationResult:
    """Run a simulated fine-tuning attack and return the meta-gradient of the suppression losses.

    The attacker takes one `optimizer` step per support batch on `task_loss`; after every step the suppression
    loss is evaluated on the matching query batch and the losses are summed (uniform weights, as in SOPHON).

    Args:
        view (`SimulationView`): module, adapted and frozen tensors, and the map back to model parameters.
        task_loss (`Callable`): `(module, batch, params) -> (loss, outputs)`, what the attacker minimises.
        suppression_loss (`Callable`): `(module, batch, params) -> (loss, outputs)`, what SOPHON minimises.
        batch_metric (`Callable`): `(outputs, batch) -> float`, logged for the last query batch.
        optimizer (`InnerOptimizer`): a fresh functional optimizer.
        support_batches, query_batches: one of each per inner step.
        first_order (`bool`): treat the inner updates as constants (first-order MAML), for adapted and frozen model
            parameters alike: a frozen parameter's gradient is taken at each adapted point, not through the updates.

    Returns:
        `SimulationResult` with `meta_grads` keyed by model parameter name (parameters the attacker cannot
        influence get no entry).
    """
    grad_names = [n for n in [*view.adapted, *view.frozen] if n in view.to_model]
    if first_order:
        # Frozen model parameters are leaves of the query loss; the adapted ones are re-leafed after every step.
        frozen_leaves = {n: t.detach().requires_grad_(n in view.to_model) for n, t in view.frozen.items()}
        frozen_plain = {n: t.detach() for n, t in view.frozen.items()}
        fast = {n: t.detach().requires_grad_() for n, t in view.adapted.items()}
    else:
        frozen_leaves = frozen_plain = dict(view.frozen)
        fast = {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in view.adapted.items()}
    accumulated: dict[str, torch.Tensor] = {}
    meta_loss = 0.0
    query_losses, support_losses, metric = [], [], float("nan")
    for support, query in zip(support_batches, query_batches, strict=True):
        loss, _ = task_loss(view.module, support, {**frozen_plain, **fast})
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        fast = optimizer.step(fast, dict(zip(fast, grads)))
        if first_order:
            fast = {n: t.detach().requires_grad_() for n, t in fast.items()}
        support_losses.append(loss.item())

        q_loss, outputs = suppression_loss(view.module, query, {**frozen_leaves, **fast})
        query_losses.append(q_loss.item())
        if first_order:
            targets = [n for n in grad_names]
            tensors = [fast[n] if n in fast else frozen_leaves[n] for n in targets]
            for name, grad in zip(targets, torch.autograd.grad(q_loss, tensors)):
                key = view.to_model[name]
                accumulated[key] = grad if key not in accumulated else accumulated[key] + grad
        else:
            meta_loss = meta_loss + q_loss
    with torch.no_grad():
        metric = batch_metric(outputs, query)
    if not first_order:
        sources = [view.adapted[n] if n in view.adapted else view.frozen[n] for n in grad_names]
        grads = torch.autograd.grad(meta_loss, sources, allow_unused=True)
        accumulated = {view.to_model[n]: g for n, g in zip(grad_names, grads) if g is not None}
    final = {n: t.detach() for n, t in fast.items()}
    return SimulationResult(accumulated, query_losses, support_losses, metric, final)

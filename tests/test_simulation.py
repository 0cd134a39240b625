"""The functional simulation against hand-written fine-tuning on deep copies."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallCNN, tiny_vit

from sophon_hf.losses import inverse_cross_entropy
from sophon_hf.simulation import (
    SimulationView,
    build_lora_copy,
    fresh_lora_weights,
    parse_inner_optimizer,
    simulate_finetuning,
)
from sophon_hf.tasks import ClassificationTask


def _batches(k, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.rand(n, 1, 8, 8, generator=g), "labels": torch.randint(5, (n,), generator=g)}
        for _ in range(k)
    ]


def _task_fns(task):
    def task_loss(m, b, p):
        return task.loss(m, b, p)

    def suppression(m, b, p):
        return task.suppression_loss("inverse_cross_entropy", m, b, p)

    return task_loss, suppression


TORCH_OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "sgd_momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr, eps=1e-8),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
}


@pytest.mark.parametrize("optimizer", sorted(TORCH_OPTIMIZERS))
def test_first_order_simulation_equals_hand_written_finetuning(optimizer):
    torch.manual_seed(0)
    model = tiny_vit().eval()  # eval: no dropout, so both paths see the same function
    task = ClassificationTask(model)
    supports, queries = _batches(3, seed=1), _batches(3, seed=2)
    lr = 1e-2 if optimizer.startswith("sgd") else 1e-3
    params = dict(model.named_parameters())
    view = SimulationView(model, params, {}, {n: n for n in params})
    result = simulate_finetuning(
        view, *_task_fns(task), task.batch_metric, parse_inner_optimizer(optimizer, lr), supports, queries
    )

    # Hand-written attacker on a deep copy; the first-order meta-gradient is the sum of query-loss gradients
    # taken at each fine-tuned copy.
    attacker = copy.deepcopy(model)
    opt = TORCH_OPTIMIZERS[optimizer](attacker.parameters(), lr)
    expected = {n: torch.zeros_like(p) for n, p in attacker.named_parameters()}
    support_losses = []
    for support, query in zip(supports, queries):
        opt.zero_grad()
        loss = F.cross_entropy(attacker(pixel_values=support["pixel_values"]).logits, support["labels"])
        loss.backward()
        support_losses.append(loss.item())
        opt.step()
        attacker.zero_grad()
        logits = attacker(pixel_values=query["pixel_values"]).logits
        inverse_cross_entropy(logits, query["labels"]).backward()
        for n, p in attacker.named_parameters():
            expected[n] += p.grad
    assert result.support_losses == pytest.approx(support_losses, rel=1e-5)
    # The logged `fts/query_accuracy`: the attacker's accuracy on the last query batch after its last step.
    assert result.query_metric == (logits.argmax(-1) == queries[-1]["labels"]).float().mean().item()
    for name, grad in expected.items():
        torch.testing.assert_close(result.meta_grads[name], grad, rtol=1e-4, atol=1e-6)
    # The simulation never touches the model itself.
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name])


def test_first_order_gradient_equals_detached_version_and_second_order_differs():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    task = ClassificationTask(model)
    supports, queries = _batches(2, seed=3), _batches(2, seed=4)
    supports = [{**b, "pixel_values": b["pixel_values"]} for b in supports]
    params = dict(model.named_parameters())
    make_view = lambda: SimulationView(model, params, {}, {n: n for n in params})  # noqa: E731
    first = simulate_finetuning(
        make_view(),
        *_task_fns(task),
        task.batch_metric,
        parse_inner_optimizer("sgd", 0.5),
        supports,
        queries,
        first_order=True,
    )
    # Detached by hand: fast weights after each SGD step, detached, as independent leaves.
    fast = {n: p.detach().clone() for n, p in params.items()}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for support, query in zip(supports, queries):
        leaves = {n: t.requires_grad_() for n, t in fast.items()}
        loss, _ = task.loss(model, support, leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        fast = {n: (t - 0.5 * g).detach().requires_grad_() for (n, t), g in zip(leaves.items(), grads)}
        q, _ = task.suppression_loss("inverse_cross_entropy", model, query, fast)
        for n, g in zip(fast, torch.autograd.grad(q, list(fast.values()))):
            expected[n] += g
    for n in params:
        torch.testing.assert_close(first.meta_grads[n], expected[n], rtol=1e-4, atol=1e-6)

    second = simulate_finetuning(
        make_view(),
        *_task_fns(task),
        task.batch_metric,
        parse_inner_optimizer("sgd", 0.5),
        supports,
        queries,
        first_order=False,
    )

    # Second order: the exact gradient of the unrolled computation, checked against torch.func.grad of it.
    def unrolled(p):
        total = 0.0
        for support, query in zip(supports, queries):
            loss, _ = task.loss(model, support, p)
            g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {n: t - 0.5 * gi for (n, t), gi in zip(p.items(), g)}
            total = total + task.suppression_loss("inverse_cross_entropy", model, query, p)[0]
        return total

    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    exact = torch.autograd.grad(unrolled(leaves), list(leaves.values()))
    for n, g in zip(leaves, exact):
        torch.testing.assert_close(second.meta_grads[n], g, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(first.meta_grads[n], second.meta_grads[n], atol=1e-6) for n in params)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "adagrad"])
def test_second_order_through_adaptive_optimizers_survives_dead_units(optimizer):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # a dead unit: its weights get exactly zero gradients, so their second moment stays 0
        model.body[8].bias[0] = -1e4
    task = ClassificationTask(model)
    params = dict(model.named_parameters())
    result = simulate_finetuning(
        SimulationView(model, params, {}, {n: n for n in params}),
        *_task_fns(task),
        task.batch_metric,
        parse_inner_optimizer(optimizer, 1e-3),
        _batches(2, seed=5),
        _batches(2, seed=6),
        first_order=False,
    )
    assert all(torch.isfinite(g).all() for g in result.meta_grads.values())
    assert result.meta_grads["body.8.weight"][1:].abs().sum() > 0


def test_lora_simulation_adapts_only_adapters_and_leaves_base_unchanged():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    task = ClassificationTask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_model, base_map, adapters = build_lora_copy(model, task.head_name, r=2, alpha=4)
    assert adapters and all("lora_" in a for a in adapters)
    assert set(base_map.values()) == {n for n, _ in model.named_parameters()}
    own = dict(model.named_parameters())
    frozen = {peft: own[name] for peft, name in base_map.items()}
    fresh = fresh_lora_weights(lora_model, adapters, torch.Generator().manual_seed(0))
    assert all(fresh[a].abs().sum() == 0 for a in adapters if ".lora_B." in a)  # B starts at zero, like PEFT
    seen = []

    def task_loss(m, b, p):
        # Inside the inner loop the base tensors handed to the model are always the unchanged originals.
        for peft, name in base_map.items():
            seen.append(torch.equal(p[peft], before[name]))
        return task.loss(m, b, p)

    result = simulate_finetuning(
        SimulationView(lora_model, fresh, frozen, dict(base_map)),
        task_loss,
        _task_fns(task)[1],
        task.batch_metric,
        parse_inner_optimizer("adam", 1e-2),
        _batches(3, seed=5),
        _batches(3, seed=6),
    )
    assert seen and all(seen)
    assert set(result.meta_grads) <= set(before)
    assert any(g.abs().sum() > 0 for g in result.meta_grads.values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("targets", [["does_not_exist"], ["q_proj", "valeu"]], ids=["none-match", "one-misspelt"])
def test_lora_targets_that_match_nothing_are_refused(targets):
    with pytest.raises(ValueError, match=rf"\['{targets[-1]}'\] match no module"):
        build_lora_copy(tiny_vit(), "classifier", r=2, alpha=4, target_modules=targets)


def test_inner_optimizer_specs():
    assert parse_inner_optimizer("adam:1e-3", 0.1).lr == 1e-3
    assert parse_inner_optimizer("sgd", 0.1).lr == 0.1
    with pytest.raises(ValueError, match="Unknown inner optimizer"):
        parse_inner_optimizer("lbfgs", 0.1)
    with pytest.raises(ValueError, match="learning rate"):
        parse_inner_optimizer("adam:fast", 0.1)

import math

import pytest
import torch

from sophon_hf.losses import (
    classification_suppression_loss,
    denial_of_service,
    inverse_cross_entropy,
    inverse_cross_entropy_negated_logits,
    kl_uniform,
)


def test_inverse_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits, -1)
    expected = (-torch.log(1 - p[0, 0]) - torch.log(1 - p[1, 2])) / 2
    assert torch.allclose(inverse_cross_entropy(logits, labels), expected, atol=1e-6)
    assert math.isclose(inverse_cross_entropy(torch.zeros(1, 2), torch.tensor([1])).item(), math.log(2), rel_tol=1e-6)


def test_inverse_cross_entropy_is_stable_when_true_class_dominates():
    # p_y = 1 - 1e-40 in float32: the naive -log(1 - p_y) is inf, the logsumexp form is exact (= 100).
    logits = torch.tensor([[100.0, 0.0]])
    assert torch.isclose(inverse_cross_entropy(logits, torch.tensor([0])), torch.tensor(100.0), atol=1e-4)


def test_negated_logits_variant_is_cross_entropy_of_negated_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    p = torch.softmax(-logits, -1)
    assert torch.allclose(inverse_cross_entropy_negated_logits(logits, torch.tensor([1])), -torch.log(p[0, 1]))


def test_kl_uniform_hand_computed_and_zero_at_uniform():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(kl_uniform(logits).item(), expected, rel_tol=1e-5)
    assert kl_uniform(torch.full((4, 7), 3.0)).abs().item() < 1e-6


def test_denial_of_service_is_mean_squared_prediction():
    assert denial_of_service(torch.tensor([[1.0, -2.0], [0.0, 3.0]])).item() == pytest.approx((1 + 4 + 0 + 9) / 4)


def test_unknown_or_wrong_task_loss_is_refused():
    with pytest.raises(ValueError, match="denial_of_service"):
        classification_suppression_loss("denial_of_service", torch.zeros(1, 2), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_scored_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    logits, labels = (torch.randn(16, 100, generator=g) * 4).to(dtype), torch.randint(100, (16,), generator=g)
    for loss in (inverse_cross_entropy, inverse_cross_entropy_negated_logits, kl_uniform):
        low = loss(logits, labels)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, loss(logits.float(), labels))  # the same numbers as float32 logits


def test_negated_logits_variant_on_an_asymmetric_example():
    # [1, 2, 3] with label 1 is symmetric: softmax(z)[1] == softmax(-z)[1], so it cannot tell the negation apart.
    logits, label = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([0])
    expected = -torch.log_softmax(-logits, -1)[0, 0]  # log(e^-1 + e^-2 + e^-4) + 1
    assert torch.allclose(inverse_cross_entropy_negated_logits(logits, label), expected)
    assert not torch.allclose(
        inverse_cross_entropy_negated_logits(logits, label), torch.nn.functional.cross_entropy(logits, label)
    )


def test_kl_uniform_is_stable_for_confident_logits():
    # p = (e^-200, 1): softmax underflows to 0 in float32, but log_softmax is exact: KL = 100 - log 2.
    value = kl_uniform(torch.tensor([[0.0, 200.0]]))
    assert torch.isfinite(value) and value.item() == pytest.approx(100 - math.log(2), rel=1e-6)


def test_dispatch_reaches_each_classification_loss():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=g) * 3, torch.randint(4, (6,), generator=g)
    for name, loss in [
        ("inverse_cross_entropy", inverse_cross_entropy(logits, labels)),
        ("inverse_cross_entropy_negated_logits", inverse_cross_entropy_negated_logits(logits, labels)),
        ("kl_uniform", kl_uniform(logits)),
    ]:
        torch.testing.assert_close(classification_suppression_loss(name, logits, labels), loss, msg=name)
    values = [
        classification_suppression_loss(n, logits, labels).item()
        for n in ("inverse_cross_entropy", "inverse_cross_entropy_negated_logits", "kl_uniform")
    ]
    assert len(set(values)) == 3  # three different losses on this batch

import math

import pytest
import torch

from carlzoo.training.loss import (
    CARLLoss,
    consistency_loss,
    consistency_loss_from_logits,
    kl_to_uniform,
    kl_weight,
    mean_assignment,
    uniform_prior_loss,
)


def one_hot(idx: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(idx), k).float()


def test_consistency_zero_for_identical_confident_assignments():
    p = one_hot([0, 3, 2, 1], 5)
    assert consistency_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_known_value_for_uniform_assignments():
    k = 8
    p = torch.full((4, k), 1.0 / k)
    # <p, p> = 1/K for uniform rows, so L_c = log K.
    assert consistency_loss(p, p).item() == pytest.approx(math.log(k), rel=1e-6)


def test_consistency_large_but_finite_for_disagreeing_views():
    loss = consistency_loss(one_hot([0, 1], 4), one_hot([1, 0], 4))
    assert torch.isfinite(loss) and loss.item() > 10


def test_consistency_from_logits_is_exact_and_keeps_its_gradient_when_views_disagree():
    # Two prototypes, logit gap 30, views on opposite ones: <p_a, p_b> ~ 2e-13, below the
    # probability form's floor. log p_a + log p_b = -30 - log(1 + e^-30) for both k, so
    # L_c = 30 - log 2 (+ 2 log(1 + e^-30), negligible).
    a = torch.tensor([[30.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 30.0]], requires_grad=True)
    loss = consistency_loss_from_logits(a, b)
    assert loss.item() == pytest.approx(30 - math.log(2), rel=1e-6)
    loss.backward()
    # d/da of -logsumexp(log_softmax(a) + log_softmax(b)): -(q - p_a) with q = softmax of the
    # sum (uniform here) and p_a = (1, 0): (0.5, -0.5).
    torch.testing.assert_close(a.grad, torch.tensor([[0.5, -0.5]]))
    # Where the probability form is exact, both agree.
    g = torch.Generator().manual_seed(0)
    la, lb = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    torch.testing.assert_close(consistency_loss_from_logits(la, lb),
                               consistency_loss(la.softmax(1), lb.softmax(1)))


def test_uniform_prior_zero_when_mean_is_uniform():
    # Each row is confident, but the batch covers all prototypes equally.
    p = one_hot([0, 1, 2, 3], 4)
    assert uniform_prior_loss(p).item() == pytest.approx(0.0, abs=1e-6)


def test_uniform_prior_log_k_when_collapsed():
    k = 10
    p = one_hot([3] * 6, k)
    assert uniform_prior_loss(p).item() == pytest.approx(math.log(k), rel=1e-5)


def test_uniform_prior_matches_kl_definition():
    # A KL near 0 (a mean of 16 random rows is close to uniform) carries float32 rounding
    # of its ~2 terms: compare with an absolute tolerance as well.
    p = torch.softmax(torch.randn(16, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    pbar = p.mean(0)
    uniform = torch.full_like(pbar, 1 / 7)
    expected = (pbar.double() * (pbar.double() / uniform.double()).log()).sum()
    assert uniform_prior_loss(p).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(mean_assignment(p), pbar)
    assert kl_to_uniform(pbar).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, 4.0), (50, 2.75), (100, 1.5), (150, 1.5), (-3, 4.0)],
)
def test_kl_weight_schedule(epoch, expected):
    assert kl_weight(epoch, start=4.0, end=1.5, decay_epochs=100) == pytest.approx(expected)


def test_kl_weight_without_decay_is_constant_end():
    assert kl_weight(5, start=4.0, end=1.5, decay_epochs=0) == 1.5


def test_carl_loss_combines_terms_and_is_float32_under_autocast():
    torch.manual_seed(0)
    la, lb = torch.randn(8, 6), torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = CARLLoss()(la.bfloat16(), lb.bfloat16(), 2.0)
    assert terms.total.dtype == torch.float32
    pa, pb = torch.softmax(la.bfloat16().float(), 1), torch.softmax(lb.bfloat16().float(), 1)
    expected_c = consistency_loss(pa, pb)
    expected_kl = uniform_prior_loss(torch.cat([pa, pb]))
    assert terms.consistency.item() == pytest.approx(expected_c.item(), rel=1e-5)
    assert terms.uniform_prior.item() == pytest.approx(expected_kl.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx((expected_c + 2.0 * expected_kl).item(), rel=1e-5)
    assert terms.mean_assignment.shape == (6,)
    assert terms.mean_assignment.sum().item() == pytest.approx(1.0, rel=1e-5)
    p = torch.cat([pa, pb])
    expected_h = -(p * p.log()).sum(dim=1).mean()
    assert terms.entropy.item() == pytest.approx(expected_h.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("scale", "expected"), [(0.0, math.log(6)), (1e3, 0.0)]  # equal logits; one far ahead
)
def test_carl_loss_entropy_of_the_assignments(scale, expected):
    logits = torch.zeros(4, 6)
    logits[:, 2] = scale
    terms = CARLLoss()(logits, logits, 1.0)
    assert terms.entropy.item() == pytest.approx(expected, abs=1e-6)
    assert not terms.entropy.requires_grad


def test_carl_loss_gradient_reaches_both_views():
    la = torch.randn(4, 5, requires_grad=True)
    lb = torch.randn(4, 5, requires_grad=True)
    CARLLoss()(la, lb, 1.5).total.backward()
    assert la.grad is not None and la.grad.abs().sum() > 0
    assert lb.grad is not None and lb.grad.abs().sum() > 0

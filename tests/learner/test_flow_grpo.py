"""Flow-GRPO's clipped surrogate and KL term on hand-computed numbers."""

import math

import pytest
import torch

from learner.objectives.flow_grpo import flow_grpo_loss

EPS = 0.2  # a wide clip range so the hand numbers are readable
# log-ratios chosen so that r = exp(new − old) = (1.5, 1.1, 0.5, 0.9)
NEW = torch.tensor([math.log(1.5), math.log(1.1), math.log(0.5), math.log(0.9)])
OLD = torch.zeros(4)
ADV = torch.tensor([2.0, 2.0, -1.0, -1.0])


def test_clipped_objective_hand_computed():
    # ℓ = max(−A·r, −A·clip(r, 0.8, 1.2))
    # 0: A = 2,  r = 1.5 (clipped):   max(−3.0, −2.4) = −2.4
    # 1: A = 2,  r = 1.1 (inside):    max(−2.2, −2.2) = −2.2
    # 2: A = −1, r = 0.5 (clipped):   max(0.5, 0.8)   = 0.8
    # 3: A = −1, r = 0.9 (inside):    max(0.9, 0.9)   = 0.9
    losses, stats = flow_grpo_loss(NEW, OLD, ADV, clip_eps=EPS)
    torch.testing.assert_close(losses, torch.tensor([-2.4, -2.2, 0.8, 0.9]))
    assert float(stats["clip_fraction"]) == pytest.approx(0.5)  # |r − 1| > 0.2 for samples 0 and 2
    assert float(stats["ratio_mean"]) == pytest.approx((1.5 + 1.1 + 0.5 + 0.9) / 4)  # 1.0
    # approx_kl = mean(old − new) = −(ln 1.5 + ln 1.1 + ln 0.5 + ln 0.9)/4 = −ln(0.7425)/4
    assert float(stats["approx_kl"]) == pytest.approx(-math.log(1.5 * 1.1 * 0.5 * 0.9) / 4)
    assert float(stats["kl"]) == 0.0


def test_pessimistic_side_is_not_clipped():
    # A > 0 with r = 0.5 < 1 − ε: max(−2·0.5, −2·0.8) = max(−1.0, −1.6) = −1.0, the
    # unclipped term, and its gradient ∂ℓ/∂log p = −A·r = −1.0 survives.
    # A < 0 with r = 1.5 > 1 + ε: max(1.5, 1.2) = 1.5, gradient −A·r = 1.5.
    new = torch.tensor([math.log(0.5), math.log(1.5)], requires_grad=True)
    losses, _ = flow_grpo_loss(new, torch.zeros(2), torch.tensor([2.0, -1.0]), clip_eps=EPS)
    torch.testing.assert_close(losses, torch.tensor([-1.0, 1.5]))
    losses.sum().backward()
    torch.testing.assert_close(new.grad, torch.tensor([-1.0, 1.5]))


def test_gradient_is_zero_for_clipped_samples():
    # ∂ℓ/∂log p = −A·r where the unclipped term is active, 0 where the clipped one is:
    # (0, −2·1.1, 0, −(−1)·0.9) = (0, −2.2, 0, 0.9)
    new = NEW.clone().requires_grad_(True)
    losses, _ = flow_grpo_loss(new, OLD, ADV, clip_eps=EPS)
    losses.sum().backward()
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -2.2, 0.0, 0.9]))


def test_kl_term_hand_computed():
    # Two samples of two elements; std = (0.5, 1.0) per sample.
    # 0: μ_θ − μ_ref = (1, 1):  mean of (1, 1)/(2·0.25) = 2.0
    # 1: μ_θ − μ_ref = (2, 0):  mean of (4, 0)/(2·1)    = 1.0
    # r = 1 (same log-probs), A = (1, −1): policy terms (−1, 1); β = 0.1:
    # ℓ = (−1 + 0.1·2, 1 + 0.1·1) = (−0.8, 1.1)
    mean_theta = torch.tensor([[1.0, 1.0], [2.0, 0.0]], requires_grad=True)
    mean_ref = torch.zeros(2, 2)
    lp = torch.zeros(2)
    losses, stats = flow_grpo_loss(
        lp, lp, torch.tensor([1.0, -1.0]), mean_theta=mean_theta, mean_ref=mean_ref,
        std=torch.tensor([0.5, 1.0]), kl_beta=0.1,
    )
    torch.testing.assert_close(losses, torch.tensor([-0.8, 1.1]))
    assert float(stats["kl"]) == pytest.approx(1.5)
    # ∂(β·KL_i)/∂μ_θ = β·(μ_θ − μ_ref)/(std²·D), D = 2 elements:
    # 0: 0.1·(1, 1)/(0.25·2) = (0.2, 0.2);  1: 0.1·(2, 0)/(1·2) = (0.1, 0)
    losses.sum().backward()
    torch.testing.assert_close(mean_theta.grad, torch.tensor([[0.2, 0.2], [0.1, 0.0]]))
    # with kl_beta = 0 the KL is reported but not added; a scalar std = 1:
    # 0: mean(1, 1)/(2·1) = 0.5;  1: mean(4, 0)/(2·1) = 1.0;  kl = (0.5 + 1.0)/2 = 0.75
    losses0, stats0 = flow_grpo_loss(
        lp, lp, torch.tensor([1.0, -1.0]), mean_theta=mean_theta, mean_ref=mean_ref, std=1.0
    )
    torch.testing.assert_close(losses0, torch.tensor([-1.0, 1.0]))
    assert float(stats0["kl"]) == pytest.approx(0.75)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mean_theta, mean_ref and std"):
        flow_grpo_loss(NEW, OLD, ADV, kl_beta=0.04)
    with pytest.raises(ValueError, match="mean_theta, mean_ref and std"):
        flow_grpo_loss(NEW, OLD, ADV, kl_beta=0.04, mean_theta=torch.zeros(4, 2), mean_ref=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="clip_eps"):
        flow_grpo_loss(NEW, OLD, ADV, clip_eps=0.0)
    with pytest.raises(ValueError, match="kl_beta"):
        flow_grpo_loss(NEW, OLD, ADV, kl_beta=-1.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        flow_grpo_loss(NEW, OLD[:3], ADV)


def test_default_clip_range_is_the_papers():
    # ε = 1e-4: r = 1.5 with A = 1 is clipped to 1.0001 → ℓ = −1.0001
    losses, _ = flow_grpo_loss(torch.tensor([math.log(1.5)]), torch.zeros(1), torch.ones(1))
    assert float(losses) == pytest.approx(-1.0001)

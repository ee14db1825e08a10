"""ORW-CFM-W2 loss on hand-computed numbers."""

import math

import pytest
import torch

from learner.objectives import orw_cfm_w2_loss, orw_weights
from learner.objectives.weighted import effective_sample_size

# Two samples of two elements each; τ = 1, r = (0, ln 2) → w = exp(τ r) = (1, 2); α = 0.5.
V = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
U = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
VREF = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
R = torch.tensor([0.0, math.log(2.0)])


def test_released_loss_hand_computed():
    # fm_0 = ((1−0)² + (2−0)²)/2 = 2.5     fm_1 = ((0−1)² + (0−1)²)/2 = 1.0
    # w2_0 = ((1−1)² + (2−0)²)/2 = 2.0     w2_1 = ((0−0)² + (0−2)²)/2 = 2.0
    # ℓ_0 = 1·2.5 + 0.5·2 = 3.5            ℓ_1 = 2·1.0 + 0.5·2 = 3.0
    losses, stats = orw_cfm_w2_loss(V, U, VREF, R, tau=1.0, alpha=0.5)
    torch.testing.assert_close(losses, torch.tensor([3.5, 3.0]))
    assert float(stats["fm"]) == pytest.approx(1.75)  # (2.5 + 1)/2
    assert float(stats["w2"]) == pytest.approx(2.0)
    assert float(stats["weight_max"]) == pytest.approx(2.0)
    # ESS fraction (Σw)²/(B·Σw²) = 9 / (2·5) = 0.9
    assert float(stats["ess"]) == pytest.approx(0.9)


def test_batch_normalised_option_hand_computed():
    # normaliser = mean(1, 2) = 1.5 → w = (2/3, 4/3)
    # ℓ_0 = 2/3·2.5 + 0.5·2 = 8/3         ℓ_1 = 4/3·1.0 + 0.5·2 = 7/3
    losses, _ = orw_cfm_w2_loss(V, U, VREF, R, tau=1.0, alpha=0.5, weight_normalizer=torch.tensor(1.5))
    torch.testing.assert_close(losses, torch.tensor([8 / 3, 7 / 3]))


def test_gradient_hand_computed():
    # ∂ℓ_0/∂v = w·2(v − u)/2 + α·2(v − v_ref)/2 = 1·(1, 2) + 0.5·(0, 2) = (1, 3)
    # ∂ℓ_1/∂v = 2·(−1, −1) + 0.5·(0, −2) = (−2, −3)
    v = V.clone().requires_grad_(True)
    losses, _ = orw_cfm_w2_loss(v, U, VREF, R, tau=1.0, alpha=0.5)
    losses.sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[1.0, 3.0], [-2.0, -3.0]]))


def test_reference_gets_no_gradient_and_tau0_alpha0_is_plain_fm():
    vref = VREF.clone().requires_grad_(True)
    losses, _ = orw_cfm_w2_loss(V, U, vref, R, tau=0.0, alpha=0.0)
    torch.testing.assert_close(losses, torch.tensor([2.5, 1.0]))  # w = 1: the FM errors
    assert not losses.requires_grad


def test_weights_and_bad_scalars():
    torch.testing.assert_close(orw_weights(torch.tensor([0.0, 1.0]), 2.0), torch.tensor([1.0, math.e ** 2]))
    with pytest.raises(ValueError, match="tau must be non-negative"):
        orw_cfm_w2_loss(V, U, VREF, R, tau=-1.0, alpha=0.5)


def test_ess_of_huge_raw_weights_is_finite_and_scale_free():
    # τ = 40 on rewards (0, 0.5, 1, 1): w = (1, e²⁰, e⁴⁰, e⁴⁰); (Σw)² ≈ 1.3e35² overflows float32
    # if computed directly. Scaled by e⁴⁰ the weights are ≈ (0, 2.1e-9, 1, 1): ESS = 2² / (4·2) = 0.5
    w = orw_weights(torch.tensor([0.0, 0.5, 1.0, 1.0]), 40.0)
    assert float(effective_sample_size(w)) == pytest.approx(0.5, rel=1e-6)
    assert float(effective_sample_size(w * 1e-20)) == pytest.approx(0.5, rel=1e-6)
    assert float(effective_sample_size(torch.zeros(3))) == 0.0

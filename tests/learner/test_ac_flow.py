"""AC-Flow's reconstructed parts on hand-computed numbers, and its ORW special case."""

import math

import pytest
import torch

from learner.critic import ValueCritic
from learner.objectives.ac_flow import ac_flow_actor_loss, critic_regression_loss, critic_weights
from learner.objectives.orw import orw_cfm_w2_loss
from samplers.digits import DIGITS_TRANSFORMER_CONFIG
from samplers.policy import build_sd3_velocity

A = torch.tensor([-1.0, 0.0, 1.0])


def test_weight_families_hand_computed():
    # exp, τ = 1: (e⁻¹, 1, e) / mean; mean = (0.36788 + 1 + 2.71828)/3 = 1.36205
    e = torch.tensor([math.exp(-1), 1.0, math.e])
    torch.testing.assert_close(critic_weights(A, family="exp", tau=1.0), e / e.mean())
    # linear, τ = 1: max(0, 1 + A) = (0, 1, 2), mean 1 already
    torch.testing.assert_close(critic_weights(A, family="linear", tau=1.0), torch.tensor([0.0, 1.0, 2.0]))
    # softplus, τ = 1: (0.31326, 0.69315, 1.31326), mean 0.77322 → (0.40514, 0.89644, 1.69842)
    torch.testing.assert_close(critic_weights(A, family="softplus", tau=1.0),
                               torch.tensor([0.40514, 0.89644, 1.69842]), atol=1e-4, rtol=0)
    # linear with every weight clipped: no sample carries weight
    assert torch.equal(critic_weights(torch.tensor([-3.0, -2.0]), family="linear", tau=1.0), torch.zeros(2))
    with pytest.raises(ValueError, match="valid: exp, linear, softplus"):
        critic_weights(A, family="cubic", tau=1.0)


def test_exp_weights_do_not_overflow():
    w = critic_weights(torch.tensor([0.0, 100.0]), family="exp", tau=10.0)  # exp(1000) overflows float32
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0]))


def test_constant_critic_exp_weighting_is_orw_gradient():
    # A = r̃ − c with a constant critic c: exp(τA) ∝ exp(τr̃), equal after normalisation, so
    # the AC-Flow actor gradient equals batch-normalised ORW-CFM-W2's on r̃
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 1, 2, 2, generator=g)
    u, vref = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    r, c, tau = torch.tensor([0.2, -0.5, 0.9, 0.1]), 0.37, 2.0
    v1, v2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    ac, _ = ac_flow_actor_loss(v1, u, vref, critic_weights(r - c, family="exp", tau=tau), alpha=0.5)
    orw, _ = orw_cfm_w2_loss(v2, u, vref, r, tau=tau, alpha=0.5, weight_normalizer=torch.exp(tau * r).mean())
    ac.sum().backward()
    orw.sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-6)


def test_critic_regression_hand_computed():
    # V = (0, 1, 1), r̃ = (0, 1, 2): losses (0, 0, 1); Var(r̃) = 2/3, r̃ − V = (0, 0, 1),
    # Var(r̃ − V) = 2/9 → explained variance 1 − (2/9)/(2/3) = 2/3
    losses, stats = critic_regression_loss(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.0, 1.0]))
    assert float(stats["explained_variance"]) == pytest.approx(2 / 3)


def test_critic_is_small_and_shaped():
    policy = build_sd3_velocity(dict(DIGITS_TRANSFORMER_CONFIG))
    critic = ValueCritic(in_channels=1, cond_dim=384)
    n_critic = sum(p.numel() for p in critic.parameters())
    n_policy = sum(p.numel() for p in policy.parameters())
    assert n_critic <= 0.10 * n_policy, (n_critic, n_policy)
    out = critic(torch.randn(5, 1, 8, 8), torch.rand(5), torch.randn(5, 384))
    assert out.shape == (5,)
    # SD3-shaped latents work unchanged (global pooling)
    assert ValueCritic(16, 2048)(torch.randn(2, 16, 32, 32), torch.rand(2), torch.randn(2, 2048)).shape == (2,)

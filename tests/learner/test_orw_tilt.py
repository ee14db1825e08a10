"""Known answer (i): one reward-weighted fit with α = 0 moves a 1-D mixture to q·exp(τr)/Z.

ORW-CFM-W2's fixed point (seed 001, Thm. 1 with α = 0) is the reward-tilted data
distribution. Data q = ½·N(−2, σ²) + ½·N(2, σ²), σ = 0.3, reward r(x) = x, τ = 0.25.
Tilting a Gaussian N(μ, σ²) by exp(τx) gives N(μ + τσ², σ²) with mass ∝ exp(τμ + τ²σ²/2), so

    right-mode weight = e^{2τ} / (e^{2τ} + e^{−2τ}) = sigmoid(4τ) = sigmoid(1) = 0.7311
    mode means ±2 + τσ² = ±2 + 0.0225
    mean = 0.7311·2.0225 − 0.2689·1.9775 = 1.4786 − 0.5317 = 0.9469

A small MLP velocity is fitted once by the project's ORW loss (batch-normalised weights,
α = 0) on 4,096 draws of q and sampled with the project's Euler steps; the same fit with
τ = 0 is the control (weights 1: it must reproduce q itself).
"""

import math

import pytest
import torch
from torch import nn

from learner.objectives.orw import orw_cfm_w2_loss, orw_weights
from samplers.flow import euler_step, interpolate, sampling_sigmas, velocity_target

SIGMA, MU, TAU = 0.3, 2.0, 0.25


def draw_q(n: int, g: torch.Generator) -> torch.Tensor:
    side = torch.where(torch.rand(n, generator=g) < 0.5, -MU, MU)
    return (side + SIGMA * torch.randn(n, generator=g)).view(n, 1, 1, 1)


class Velocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.view(-1, 1), t.view(-1, 1)], 1)).view_as(x)


def fit_and_sample(tau: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x0 = draw_q(4096, g)
    rewards = x0.view(-1)
    normalizer = orw_weights(rewards, tau).mean()  # the whole batch's mean weight
    model = Velocity()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        idx = torch.randint(0, len(x0), (512,), generator=g)
        noise = torch.randn(512, 1, 1, 1, generator=g)
        t = torch.rand(512, generator=g).clamp(1e-3, 1 - 1e-3)
        v = model(interpolate(x0[idx], noise, t), t)
        losses, _ = orw_cfm_w2_loss(v, velocity_target(x0[idx], noise), v.detach(), rewards[idx],
                                    tau=tau, alpha=0.0, weight_normalizer=normalizer)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        x = torch.randn(8000, 1, 1, 1, generator=g)
        times = sampling_sigmas(100)
        for t, s in zip(times[:-1], times[1:], strict=True):
            x = euler_step(x, t, s, model(x, t.expand(len(x))))
    return x.view(-1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reward_weighted_fit_lands_on_the_tilted_mixture():
    right = 1 / (1 + math.exp(-4 * TAU))                                 # 0.7311
    mean = right * (MU + TAU * SIGMA**2) - (1 - right) * (MU - TAU * SIGMA**2)  # 0.9469
    x = fit_and_sample(TAU)
    # tolerances: 8,000 samples give a share's standard error of 0.005 and the 4,096 training
    # draws move the empirical tilt by about 0.01; the rest is the fit's own error
    assert float((x > 0).float().mean()) == pytest.approx(right, abs=0.03)
    assert float(x.mean()) == pytest.approx(mean, abs=0.12)
    assert float(x[x > 0].mean()) == pytest.approx(MU + TAU * SIGMA**2, abs=0.1)


def test_without_reward_weighting_the_fit_stays_on_q():
    x = fit_and_sample(0.0)
    assert float((x > 0).float().mean()) == pytest.approx(0.5, abs=0.03)
    assert float(x.mean()) == pytest.approx(0.0, abs=0.12)

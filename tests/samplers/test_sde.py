"""Flow-GRPO's SDE sampler: hand values, sampler/learner log-prob agreement, limits."""

import math

import pytest
import torch

from samplers.flow import sampling_sigmas
from samplers.rollout import euler_rollout
from samplers.sde import (
    gaussian_log_prob,
    grid_t_max,
    recompute_log_probs,
    sde_rollout,
    sde_sigma,
    sde_step_mean_std,
    sde_transition,
)
from samplers.text import PromptEmbeddings
from tests.helpers import table_encode, tiny_velocity

PROMPTS = ["a handwritten one", "a handwritten two", "a handwritten three"]


def _noise(b=3, seed=0):
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _rollout(model, cfg, seed=1, steps=5, shift=3.0):
    cond, uncond = table_encode(PROMPTS), table_encode([""] * len(PROMPTS))
    g = torch.Generator().manual_seed(seed)
    states, times, logp = sde_rollout(
        model, _noise(), cond, num_steps=steps, shift=shift, a=0.7, cfg_scale=cfg, uncond=uncond, generator=g
    )
    return states, times, logp, cond, uncond


def test_sigma_hand_values_and_cap():
    # a = 0.5, t = 0.8: 0.5·sqrt(0.8/0.2) = 0.5·2 = 1.0
    assert float(sde_sigma(torch.tensor(0.8), 0.5)) == pytest.approx(1.0)
    # t = 1 with the cap t_max = 0.75: 0.5·sqrt(1/(1 − 0.75)) = 0.5·2 = 1.0; below the cap no effect
    assert float(sde_sigma(torch.tensor(1.0), 0.5, t_max=0.75)) == pytest.approx(1.0)
    assert float(sde_sigma(torch.tensor(0.5), 0.5, t_max=0.75)) == pytest.approx(0.5)
    assert math.isfinite(float(sde_sigma(torch.tensor(1.0), 0.7)))  # the default cap keeps it finite
    # on a grid the cap is its largest time below 1, i.e. its second time
    times = sampling_sigmas(10, 3.0)
    assert grid_t_max(times) == float(times[1])
    assert grid_t_max(sampling_sigmas(1)) == 0.0  # one step: σ_1 = a·sqrt(1/1) = a
    with pytest.raises(ValueError, match="t_max"):
        sde_sigma(torch.tensor(0.5), 0.7, t_max=1.0)


def test_step_mean_std_hand_computed():
    # a = 0.5, per-sample times.
    # sample 0: t = 0.8, s = 0.6, Δt = −0.2, σ² = 0.25·0.8/0.2 = 1, σ²/(2t) = 1/1.6 = 0.625,
    #   x = 1, v = −1: x + (1 − t)v = 1 − 0.2 = 0.8; drift = −1 + 0.625·0.8 = −0.5;
    #   mean = 1 + (−0.5)(−0.2) = 1.1;  std = 1·sqrt(0.2)
    # sample 1: t = 0.5, s = 0.25, Δt = −0.25, σ² = 0.25·0.5/0.5 = 0.25, σ²/(2t) = 0.25,
    #   x = 2, v = 4: x + (1 − t)v = 2 + 2 = 4; drift = 4 + 0.25·4 = 5;
    #   mean = 2 + 5·(−0.25) = 0.75;  std = 0.5·sqrt(0.25) = 0.25
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    v = torch.tensor([[-1.0, -1.0], [4.0, 4.0]])
    mean, std = sde_step_mean_std(x, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.25]), v, 0.5)
    torch.testing.assert_close(mean, torch.tensor([[1.1, 1.1], [0.75, 0.75]]))
    torch.testing.assert_close(std, torch.tensor([[math.sqrt(0.2)], [0.25]]))
    # scalar times broadcast the same way: sample 1's numbers with t = 0.5, s = 0.25
    m1, s1 = sde_step_mean_std(x[1:], torch.tensor(0.5), torch.tensor(0.25), v[1:], 0.5)
    torch.testing.assert_close(m1, torch.tensor([[0.75, 0.75]]))
    assert float(s1) == pytest.approx(0.25)


def test_gaussian_log_prob_hand_computed():
    # mean 0, std 0.5, x = (0, 0.5) → z = (0, 1);
    # log N = −z²/2 − log 0.5 − log sqrt(2π) = (0.6931 − 0.9189, −0.5 + 0.6931 − 0.9189)
    #       = (−0.2258, −0.7258), averaged over the two elements: −0.4758
    x = torch.tensor([[0.0, 0.5]])
    expected = -0.25 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    lp = gaussian_log_prob(x, torch.zeros(1, 2), torch.tensor([[0.5]]))
    assert lp.shape == (1,)
    assert float(lp) == pytest.approx(expected) and expected == pytest.approx(-0.4758, abs=1e-4)


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_learner_recomputes_the_recorded_log_probs(cfg):
    model = tiny_velocity(0)
    states, times, logp, cond, uncond = _rollout(model, cfg)
    assert states.shape == (3, 6, 1, 8, 8) and times.shape == (6,) and logp.shape == (3, 5)
    torch.testing.assert_close(states[:, 0], _noise())
    assert torch.isfinite(logp).all()
    again = recompute_log_probs(model, states, times, cond, a=0.7, cfg_scale=cfg, uncond=uncond)
    torch.testing.assert_close(again, logp, rtol=0, atol=1e-5)
    # and with grad: the graph reaches the weights
    again_grad = recompute_log_probs(model, states, times, cond, a=0.7, cfg_scale=cfg, uncond=uncond)
    again_grad.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_other_weights_give_other_log_probs():
    states, times, logp, cond, _ = _rollout(tiny_velocity(0), 1.0)
    with torch.no_grad():
        other = recompute_log_probs(tiny_velocity(1), states, times, cond, a=0.7)
    assert (other - logp).abs().max() > 1e-2


def test_rollout_is_seeded_and_checks_arguments():
    model = tiny_velocity(0)
    s1, _, l1, cond, _ = _rollout(model, 1.0, seed=3)
    s2, _, l2, _, _ = _rollout(model, 1.0, seed=3)
    s3, _, _, _, _ = _rollout(model, 1.0, seed=4)
    assert torch.equal(s1, s2) and torch.equal(l1, l2) and not torch.equal(s1, s3)
    with pytest.raises(ValueError, match="uncond"):
        sde_rollout(model, _noise(), cond, num_steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="a must be positive"):
        sde_rollout(model, _noise(), cond, num_steps=2, a=0.0)
    with pytest.raises(ValueError, match="states hold"):
        recompute_log_probs(model, s1[:, :3], sampling_sigmas(5, 3.0), cond, a=0.7)


def test_small_a_approaches_the_euler_ode():
    # a → 0: the drift correction is O(a²) and the noise O(a), so on the same initial
    # noise the SDE path tends to the Euler path, linearly in a (measured max |Δ| over
    # all states: 0.60, 0.064, 6.4e-4 for a = 1e-1, 1e-2, 1e-4). Tolerance: 2e-3 at
    # a = 1e-4, and at least 30× closer at a = 1e-4 than at a = 1e-2.
    model = tiny_velocity(0)
    cond, noise = table_encode(PROMPTS), _noise()
    ode, _ = euler_rollout(model, noise, cond, num_steps=6, shift=3.0)
    errs = {}
    for a in (1e-1, 1e-2, 1e-4):
        g = torch.Generator().manual_seed(0)
        sde, _, _ = sde_rollout(model, noise, cond, num_steps=6, shift=3.0, a=a, generator=g)
        errs[a] = float((sde - ode).abs().max())
    assert errs[1e-4] < 2e-3
    assert errs[1e-4] * 30 < errs[1e-2] < errs[1e-1]


def test_one_step_samples_have_the_stated_moments():
    # N = 4000 draws of one step from a single state (64 elements each): the standardised
    # residuals z = (x_s − mean)/std are 256 000 N(0, 1) draws, so their mean is within
    # 0.01 (≈ 5 standard errors of 0.002) of 0 and their std within 0.01 of 1; every
    # element's sample mean is within 5 standard errors (std/sqrt(N)) of its mean.
    n = 4000
    model = tiny_velocity(0)
    cond = table_encode(["a handwritten one"] * n)
    x_t = _noise(1, seed=7).expand(n, -1, -1, -1)
    times = sampling_sigmas(10, 3.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x_s, logp, mean, std = sde_transition(
            model, x_t, None, times[3], times[4], cond, a=0.7, t_max=grid_t_max(times), generator=g
        )
    assert torch.allclose(mean, mean[:1].expand_as(mean), atol=1e-5)  # one state, one mean
    z = (x_s - mean) / std
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    assert std.ndim == 0  # scalar times give a scalar std
    assert float((x_s.mean(0) - mean[0]).abs().max() / std) < 5 / math.sqrt(n)
    # E[log N(x_s; mean, std²)] = −1/2 − log std − log sqrt(2π)
    expected = -0.5 - math.log(float(std)) - 0.5 * math.log(2 * math.pi)
    assert float(logp.mean()) == pytest.approx(expected, abs=0.01)


class _ExactGaussianVelocity(torch.nn.Module):
    """The exact velocity E[ε − x0 | x_t] for 1-D data x0 ~ N(m, s²).

    x_t ~ N(μ_t, V_t), μ_t = (1 − t)m, V_t = (1 − t)²s² + t²; Cov(ε, x_t) = t and
    Cov(x0, x_t) = (1 − t)s², so v(x, t) = (t − (1 − t)s²)(x − μ_t)/V_t − m.
    """

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, t, cond):
        t = t.reshape(-1, 1, 1, 1)
        mu, var = (1 - t) * self.m, (1 - t) ** 2 * self.s**2 + t**2
        return (t - (1 - t) * self.s**2) * (x - mu) / var - self.m


def test_sde_with_the_exact_velocity_keeps_the_marginals():
    # The SDE has the ODE's marginals: with the exact field of N(0.5, 0.6²) data, the
    # samples at t = 0 are N(0.5, 0.6²) and midway N(μ_t, V_t). 20 000 draws: the
    # standard error of the mean is 0.6/sqrt(20 000) ≈ 0.004, of the std ≈ 0.003; the
    # tolerance 0.02 also covers the discretisation bias of 50 steps (measured ≲ 0.01).
    m, s, n, k = 0.5, 0.6, 20000, 50
    cond = PromptEmbeddings(torch.zeros(n, 1, 1), torch.zeros(n, 1))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, 1, 1, generator=g)
    states, times, logp = sde_rollout(_ExactGaussianVelocity(m, s), noise, cond, num_steps=k, a=0.7, generator=g)
    final, mid, tm = states[:, -1].flatten(), states[:, k // 2].flatten(), float(times[k // 2])
    assert float(final.mean()) == pytest.approx(m, abs=0.02)
    assert float(final.std()) == pytest.approx(s, abs=0.02)
    assert float(mid.mean()) == pytest.approx((1 - tm) * m, abs=0.02)
    assert float(mid.std()) == pytest.approx(math.sqrt((1 - tm) ** 2 * s**2 + tm**2), abs=0.02)
    assert torch.isfinite(logp).all()

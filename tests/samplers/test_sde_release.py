"""The SDE, CPS and Fast-window steps against float64 transcriptions of the released code.

Each ``_release_*`` function below restates, in float64 and in the release's own variable
names, one formula of yifan123/flow_grpo's ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``
(@ 54809b5, ``sde_step_with_logprob``; line numbers in the comments) or of its Fast pipeline
(``sd3_pipeline_with_logprob_fast.py``). The project's functions must give the same numbers
on the same tensors to ~1e-12.
"""

import math

import pytest
import torch

from samplers.flow import sampling_sigmas
from samplers.rollout import guided_velocity
from samplers.sde import (
    cps_log_prob,
    cps_step_mean_std,
    draw_window,
    gaussian_log_prob,
    grid_t_max,
    noise_level,
    recompute_log_probs,
    sde_rollout,
    sde_step_mean_std,
    step_log_prob,
    step_mean_std,
)
from tests.helpers import table_encode, tiny_velocity

TOL = {"rtol": 1e-12, "atol": 1e-12}
PROMPTS = ["a handwritten one", "a handwritten two", "a handwritten three"]


def _release_sde(sigmas, idx, model_output, sample, noise_level, prev_sample):
    """sde_type == 'sde': L44–47 sigma, sigma_prev, sigma_max = sigmas[1], dt; L50 std_dev_t;
    L53 prev_sample_mean; L64–68 log_prob; L89 mean over all but the batch dimension."""
    sigma = sigmas[idx].view(-1, 1, 1, 1)
    sigma_prev = sigmas[idx + 1].view(-1, 1, 1, 1)
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    log_prob = (-((prev_sample - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=torch.float64))))
    return prev_sample_mean, std_dev_t, std_dev_t * torch.sqrt(-dt), log_prob.mean(dim=(1, 2, 3))


def _release_cps(sigmas, idx, model_output, sample, noise_level, prev_sample):
    """sde_type == 'cps': L71 std_dev_t; L72 x̂0; L73 x̂1; L74 mean; L86 log_prob (constants
    removed); L89 mean over dimensions."""
    sigma = sigmas[idx].view(-1, 1, 1, 1)
    sigma_prev = sigmas[idx + 1].view(-1, 1, 1, 1)
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = sample - sigma * model_output
    noise_estimate = sample + model_output * (1 - sigma)
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(sigma_prev**2 - std_dev_t**2)
    log_prob = -((prev_sample - prev_sample_mean) ** 2)
    return prev_sample_mean, std_dev_t, log_prob.mean(dim=(1, 2, 3))


def _tensors(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("a", [0.7, 1.0])
def test_sde_step_equals_the_release(a):
    sigmas = sampling_sigmas(10, 3.0).double()
    idx = torch.tensor([0, 1, 4, 8, 9])  # t = 1 (the capped step), inner steps, the last step into 0
    v, x, x_prev = _tensors(5)
    mean_r, std_dev_t, step_std, lp_r = _release_sde(sigmas, idx, v, x, a, x_prev)
    t, s = sigmas[idx], sigmas[idx + 1]
    mean, std = sde_step_mean_std(x, t, s, v, a, t_max=grid_t_max(sigmas))
    torch.testing.assert_close(mean, mean_r, **TOL)
    torch.testing.assert_close(std, step_std, **TOL)
    torch.testing.assert_close(noise_level(t, s, a, "sde", t_max=grid_t_max(sigmas)), std_dev_t.flatten(), **TOL)
    torch.testing.assert_close(gaussian_log_prob(x_prev, mean, std), lp_r, **TOL)
    assert mean.dtype == torch.float64


@pytest.mark.parametrize("a", [0.5, 0.8])
def test_cps_step_equals_the_release(a):
    sigmas = sampling_sigmas(10, 3.0).double()
    idx = torch.tensor([0, 3, 7, 9])  # the last step (σ_prev = 0) has std 0: mean = x̂0
    v, x, x_prev = _tensors(4, seed=1)
    mean_r, std_r, lp_r = _release_cps(sigmas, idx, v, x, a, x_prev)
    t, s = sigmas[idx], sigmas[idx + 1]
    mean, std = cps_step_mean_std(x, t, s, v, a)
    torch.testing.assert_close(mean, mean_r, **TOL)
    torch.testing.assert_close(std, std_r, **TOL)
    torch.testing.assert_close(noise_level(t, s, a, "cps"), std_r.flatten(), **TOL)
    torch.testing.assert_close(cps_log_prob(x_prev, mean), lp_r, **TOL)
    torch.testing.assert_close(step_log_prob("cps", x_prev, mean, std), lp_r, **TOL)
    m2, s2 = step_mean_std("cps", x, t, s, v, a)
    assert torch.equal(m2, mean) and torch.equal(s2, std)
    with pytest.raises(ValueError, match="unknown step kind"):
        step_mean_std("ddim", x, t, s, v, a)  # type: ignore[arg-type]


def test_noise_level_zero_is_the_euler_step_for_both_kinds():
    # the Fast pipeline's steps outside the window run with noise_level 0: 'sde' gives
    # std_dev_t = 0 and mean = x + v·dt (L53), 'cps' gives std 0 and the same mean (L74)
    sigmas = sampling_sigmas(6, 3.0).double()
    idx = torch.tensor([1, 2, 5])
    v, x, _ = _tensors(3, seed=2)
    euler = x + (sigmas[idx + 1] - sigmas[idx]).view(-1, 1, 1, 1) * v
    mean_sde, _, _, _ = _release_sde(sigmas, idx, v, x, 0.0, x)
    mean_cps, _ = cps_step_mean_std(x, sigmas[idx], sigmas[idx + 1], v, 0.0)
    torch.testing.assert_close(mean_sde, euler, **TOL)
    torch.testing.assert_close(mean_cps, euler, **TOL)


def test_window_is_drawn_as_released():
    # random.randint(lo, hi − size) includes both ends: size 3 in [0, 5) starts at 0, 1 or 2
    starts = {draw_window(10, 3, 0, 5, torch.Generator().manual_seed(i))[0] for i in range(200)}
    assert starts == {0, 1, 2}
    assert draw_window(10, 2, 4, 6) == (4, 6)
    with pytest.raises(ValueError, match="does not fit"):
        draw_window(10, 4, 0, 3)


def _fast_rollout(model, kind, window, cfg=1.0):
    cond, uncond = table_encode(PROMPTS), table_encode([""] * 3)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    states, times, logp = sde_rollout(model, noise, cond, num_steps=4, shift=3.0, a=0.8, cfg_scale=cfg,
                                      uncond=uncond, generator=g, kind=kind, window=window)
    return states, times, logp, cond, uncond


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_fast_window_records_only_its_steps(kind):
    model = tiny_velocity(0)
    states, times, logp, cond, uncond = _fast_rollout(model, kind, (1, 3), cfg=3.0)
    assert torch.isnan(logp[:, [0, 3]]).all() and torch.isfinite(logp[:, 1:3]).all()
    with torch.no_grad():  # outside the window: the Euler step of the guided velocity
        for k in (0, 3):
            v = guided_velocity(model, states[:, k], times[k], cond, uncond, 3.0)
            torch.testing.assert_close(states[:, k + 1], states[:, k] + (times[k + 1] - times[k]) * v)
        again = recompute_log_probs(model, states, times, cond, a=0.8, cfg_scale=3.0, uncond=uncond, kind=kind)
    torch.testing.assert_close(again[:, 1:3], logp[:, 1:3], rtol=0, atol=1e-5)


def test_cfg_recomputation_equals_the_release_in_float64():
    # compute_log_prob (train_sd3.py @ ac4c86e L180–215): one forward on [x, x] with
    # [uncond, cond], v = v_u + g·(v_c − v_u), then sde_step_with_logprob on the recorded step
    model = tiny_velocity(0).double()
    states, times, logp, cond, uncond = _fast_rollout(model, "sde", None, cfg=4.5)
    sigmas, k = times.double(), 2
    x, x_next = states[:, k].double(), states[:, k + 1].double()
    c64 = type(cond)(cond.tokens.double(), cond.pooled.double())
    u64 = type(cond)(uncond.tokens.double(), uncond.pooled.double())
    with torch.no_grad():
        both = model(torch.cat([x, x]), sigmas[k].expand(6), type(cond)(torch.cat([u64.tokens, c64.tokens]),
                                                                        torch.cat([u64.pooled, c64.pooled])))
        v_u, v_c = both.chunk(2)
        _, _, _, lp_r = _release_sde(sigmas, torch.full((3,), k), v_u + 4.5 * (v_c - v_u), x, 0.8, x_next)
        v = guided_velocity(model, x, sigmas[k], c64, u64, 4.5)
        mean, std = sde_step_mean_std(x, sigmas[k], sigmas[k + 1], v, 0.8, t_max=grid_t_max(sigmas))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), lp_r, **TOL)
    torch.testing.assert_close(lp_r.float(), logp[:, k], rtol=0, atol=1e-4)  # the float32 rollout's record


def test_detached_unconditional_branch_carries_no_gradient():
    # train_sd3.py @ ac4c86e L190: noise_pred_uncond.detach(); d(v_u + g(v_c − v_u)) = g·dv_c
    cond, uncond = table_encode(PROMPTS), table_encode([""] * 3)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor(0.6)
    m1, m2 = tiny_velocity(0), tiny_velocity(0)
    guided_velocity(m1, x, t, cond, uncond, 4.5, detach_uncond=True).sum().backward()
    (4.5 * m2(x, t.expand(3), cond)).sum().backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        if p2.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6)

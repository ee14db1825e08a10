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


# ---- the released code, transcribed (yifan123/flow_grpo scripts/train_sd3.py @ ac4c86e) ------------
# Each _release_* restates one formula in float64 with the release's names; the project's
# function must agree on identical tensors to ~1e-12.

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _release_policy_and_kl(log_prob, old_log_prob, adv, clip_range, adv_clip_max, mean, mean_ref, std_dev_t, beta):
    """L881–897: advantages clamped to ±adv_clip_max, ratio, the clipped max, its batch mean, and
    kl_loss = mean over dims of (μ − μ_ref)² / (2·std_dev_t²), batch-averaged, added with β."""
    advantages = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped_loss, clipped_loss)
    kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    return per_sample, kl.flatten(), torch.mean(per_sample) + beta * torch.mean(kl)


def test_clipped_loss_and_kl_equal_the_release():
    from learner.advantages import clip_advantages
    from samplers.flow import sampling_sigmas
    from samplers.sde import grid_t_max, noise_level

    g = torch.Generator().manual_seed(0)
    b = 6
    lp, old = torch.randn(b, generator=g, dtype=torch.float64) * 1e-3, torch.randn(b, generator=g, dtype=torch.float64) * 1e-3
    adv = torch.tensor([7.0, -6.0, 0.3, -0.2, 0.0, 2.0], dtype=torch.float64)
    mean, mean_ref = (torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    sigmas = sampling_sigmas(10, 3.0).double()
    idx = torch.tensor([0, 1, 3, 5, 7, 8])
    std_dev_t = noise_level(sigmas[idx], sigmas[idx + 1], 0.7, "sde", t_max=grid_t_max(sigmas))
    per_r, kl_r, loss_r = _release_policy_and_kl(lp, old, adv, 1e-4, 5.0, mean, mean_ref, std_dev_t.view(-1, 1, 1, 1), 0.04)
    clipped, _ = clip_advantages(adv, 5.0)
    losses, stats = flow_grpo_loss(lp, old, clipped, clip_eps=1e-4, mean_theta=mean, mean_ref=mean_ref,
                                   std=std_dev_t, kl_beta=0.04)
    torch.testing.assert_close(losses, per_r + 0.04 * kl_r, **TOL)
    torch.testing.assert_close(losses.mean(), loss_r, **TOL)  # the learner's Σ/n over rows
    assert float(stats["kl"]) == pytest.approx(float(kl_r.mean()), rel=1e-12)


def test_timestep_selection_equals_the_release():
    from learner.objectives.flow_grpo import num_train_timesteps

    # L345: int(num_steps * timestep_fraction); L864: j in range(num_train_timesteps)
    for k in (1, 2, 5, 10, 16, 40):
        for frac in (0.5, 0.9, 0.99, 1.0):
            assert num_train_timesteps(k, frac) == max(1, int(k * frac))
    assert num_train_timesteps(10, 0.99) == 9  # the step into t = 0 is not trained
    with pytest.raises(ValueError, match="timestep_fraction"):
        num_train_timesteps(10, 0.0)


def _release_mask(advantages, num_batches, gen):
    """L797–808: mask = |A| summed over the steps ≠ 0, topped up with random zero-advantage
    samples to a multiple of num_batches (and never empty)."""
    mask = advantages.abs().sum(dim=1) != 0
    true_count = mask.sum()
    if true_count % num_batches != 0 or true_count == 0:
        false_indices = torch.where(~mask)[0]
        num_to_change = num_batches - (true_count % num_batches)
        if len(false_indices) >= num_to_change:
            random_indices = torch.randperm(len(false_indices), generator=gen)[:num_to_change]
            mask[false_indices[random_indices]] = True
    return mask


@pytest.mark.parametrize("num_batches", [1, 2, 4])
def test_zero_advantage_filter_equals_the_release(num_batches):
    from learner.objectives.flow_grpo import nonzero_advantage_mask

    cases = [torch.tensor([0.0, 1.0, -1.0, 0.0, 0.5, 0.0, 0.0, 2.0]), torch.zeros(8), torch.ones(8),
             torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])]
    for i, adv in enumerate(cases):
        steps = adv[:, None].repeat(1, 9)  # the release repeats A over its trained steps (L740)
        ours = nonzero_advantage_mask(adv, num_batches, torch.Generator().manual_seed(i))
        assert torch.equal(ours, _release_mask(steps, num_batches, torch.Generator().manual_seed(i)))
        assert int(ours.sum()) > 0


# ---- end to end on the tiny policy: each mode records log-probs the learner reproduces ---------

import dataclasses  # noqa: E402

from learner.learner import Learner, LearnerSettings  # noqa: E402
from learner.settings import FlowGRPOParams  # noqa: E402
from tests.helpers import table_encode, tiny_velocity  # noqa: E402

PROMPTS = ["a handwritten one", "a handwritten two"]


def _sampler(kind="sde", cfg=1.0, window=None, steps=3):
    from samplers.digits import IMAGE_SHAPE, to_uint8
    from samplers.sampler import Sampler

    return Sampler(tiny_velocity(), table_encode, to_uint8, IMAGE_SHAPE, num_steps=steps, kind=kind, sde_a=0.7,
                   cfg_scale=cfg, sde_window=window)


def _grpo_learner(**kw) -> Learner:
    params = FlowGRPOParams(**{"clip_eps": 0.2, "kl_beta": 0.04, **kw})
    return Learner(tiny_velocity(), table_encode, dataclasses.replace(LearnerSettings(), objective="flow_grpo",
                                                                      flow_grpo=params, micro_batch_size=64, lr=1e-2))


REWARDS8 = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])


@pytest.mark.parametrize(("kind", "step_kind", "cfg", "window", "kl_std"), [
    ("sde", "sde", 4.5, None, "noise_level"),   # the release's default: CFG rollouts and learner
    ("sde_cps", "cps", 1.0, None, "step"),      # CPS (its KL would divide by 0 at t = 0: fraction 0.99 skips it)
    ("sde_cps", "cps", 1.0, (2, 0, 2), "noise_level"),  # Fast: a 2-step window in [0, 2)
])
def test_modes_reproduce_the_recorded_log_probs(kind, step_kind, cfg, window, kl_std):
    traj = _sampler(kind, cfg, window).rollout(PROMPTS, 4, [1, 2])
    recorded = torch.isfinite(traj.log_probs)
    assert int(recorded.sum(1).max()) == (2 if window else 3)
    ln = _grpo_learner(step_kind=step_kind, cfg_scale=cfg, kl_std=kl_std)
    prep, _, _ = ln.rule.prepare(ln, _batch(ln, traj, REWARDS8))
    # trained rows: the recorded steps among the first int(3·0.99) = 2, every sample (no zero advantage)
    assert prep["x_t"].shape[0] == int((recorded[:, :2]).sum())
    st = ln.update(traj, REWARDS8)  # same weights as the sampler: every ratio is 1
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and st["clip_fraction"] == 0 and st["grad_norm"] > 0
    assert math.isfinite(st["kl"])


def _batch(ln, traj, rewards):
    from learner.rules import Batch

    return Batch(traj.states[:, -1], table_encode(list(traj.prompts)).index(traj.prompt_ids), rewards,
                 traj.prompt_list(), traj.prompt_ids, traj.states, traj.times, traj.log_probs)


def test_zero_advantage_samples_are_dropped_and_the_mean_is_over_the_rest():
    traj = _sampler().rollout(PROMPTS, 4, [1, 2])
    flat = torch.tensor([0.5] * 4 + [0.1, 0.9, 0.3, 0.7])  # prompt one's group has no spread: A = 0
    on, off = _grpo_learner(kl_beta=0.0), _grpo_learner(kl_beta=0.0, filter_zero_advantage=False)
    p_on, st_on, _ = on.rule.prepare(on, _batch(on, traj, flat))
    p_off, _, _ = off.rule.prepare(off, _batch(off, traj, flat))
    assert st_on["zero_advantage_fraction"] == pytest.approx(0.5)
    assert p_on["x_t"].shape[0] == 4 * 2 and p_off["x_t"].shape[0] == 8 * 2  # int(3·0.99) = 2 steps each
    # with β = 0 the dropped rows add 0 to the sum: the filtered mean is the unfiltered sum / kept rows
    s_on, s_off = on.update(traj, flat), off.update(traj, flat)
    assert s_on["loss"] == pytest.approx(s_off["loss"] * 2, rel=1e-5)


def test_minibatches_split_each_pass_as_released():
    # train_sd3.py @ ac4c86e L797–808 (kept count topped up to a multiple of num_batches), L829–836
    # (the kept samples permuted and reshaped into num_batches equal parts), one optimiser step
    # per part (gradient accumulation = num_batches_per_epoch / 2 → 2 steps per epoch)
    traj = _sampler().rollout(PROMPTS, 4, [1, 2])
    rewards = torch.tensor([0.5] * 4 + [0.1, 0.9, 0.3, 0.7])  # 4 kept samples
    ln = _grpo_learner(kl_beta=0.0, minibatches=2)
    b = _batch(ln, traj, rewards)
    parts = []
    for _ in range(2):
        prep, _, _ = ln.rule.prepare(ln, b)
        # each row's sample: the rollout whose recorded states hold its x_t
        parts.append({next(i for i in range(8) if (traj.states[i] == x).flatten(1).all(1).any()) for x in prep["x_t"]})
    assert len(parts[0]) == len(parts[1]) == 2 and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {4, 5, 6, 7}  # prompt one's samples (A = 0) are dropped
    ln2 = _grpo_learner(kl_beta=0.0, minibatches=2)
    ln2.update(traj, rewards)
    assert ln2.step == 2

"""AWM against a float64 transcription of its released loss, and a learner update.

The reference below follows github.com/scxue/advantage_weighted_matching (commit be51372),
``advantage_weighted_matching/scripts/train_sd3_awm.py`` (``compute_log_prob_awm`` lines 234–252,
the loss lines 1293–1354), line for line, on the release's layout: T time draws of B samples,
rows draw-major ([T·B]), advantages (B,) repeated over the draws.
"""

import dataclasses

import pytest
import torch

from learner.learner import Learner, LearnerSettings
from learner.objectives.awm import awm_log_prob, awm_loss
from learner.settings import AWMParams
from services.config import load_config
from tests.helpers import fake_batch, table_encode, tiny_velocity

GHUBER_POWER = 0.25


def _released_log_prob(noise_pred, clean_latents, random_noise, timestep, weighting):
    model_output = noise_pred.double()
    log_prob = -(model_output - (random_noise.double() - clean_latents.double())) ** 2
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if weighting == "t":
        log_prob = log_prob * timestep.view(-1)
    elif weighting == "t**2":
        log_prob = log_prob * timestep.view(-1) ** 2
    elif weighting == "Uniform":
        log_prob = log_prob
    elif weighting == "huber":
        log_prob = -(torch.sqrt(-log_prob + 1e-10) - 1e-5) * timestep.view(-1)
    elif weighting == "ghuber":
        log_prob = -(torch.pow(-log_prob + 1e-10, GHUBER_POWER)
                     - torch.pow(torch.tensor(1e-10, device=log_prob.device, dtype=log_prob.dtype), GHUBER_POWER)
                     ) * timestep.view(-1) / GHUBER_POWER
    return log_prob, model_output


def _released_loss(log_prob, old_log_prob, raw_advantages, model_output, model_output_ref, model_output_ema,
                   T, B, adv_clip_max, advantage_max, clip_range, beta, ema_beta):
    advantages = torch.clamp(raw_advantages, -adv_clip_max, adv_clip_max)
    advantages = advantages / adv_clip_max * advantage_max
    log_probs = log_prob.reshape(T, B).view(-1)  # loss_type exp_first
    old_log_probs = old_log_prob.reshape(T, B).view(-1)
    ratio = torch.exp(log_probs - old_log_probs.detach())
    advantages = advantages.unsqueeze(0).repeat(T, 1).view(-1)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    mo = model_output.reshape(T, B, *model_output.shape[1:])
    mo_ref = model_output_ref.reshape(T, B, *model_output.shape[1:])
    mo_ema = model_output_ema.reshape(T, B, *model_output.shape[1:])
    kl_loss = ((mo - mo_ref) ** 2).mean(dim=(2, 3, 4), keepdim=True).mean(dim=0).mean()  # kl_weight Uniform
    ema_kl_loss = ((mo - mo_ema) ** 2).mean(dim=(2, 3, 4), keepdim=True).mean(dim=0).mean()
    return policy_loss + beta * kl_loss + ema_beta * ema_kl_loss


OURS = {"Uniform": "uniform", "t": "t", "t**2": "t2", "huber": "huber", "ghuber": "ghuber"}


@pytest.mark.parametrize("weighting", list(OURS))
def test_matches_the_released_loss_float64(weighting):
    T, B, clip_range, beta, ema_beta = 3, 4, 0.05, 0.003, 1.0
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    x0 = torch.randn(B, 2, 4, 4, generator=g, **d)
    clean = torch.cat([x0] * T)  # the release repeats the samples per time draw
    noise = torch.randn(T * B, 2, 4, 4, generator=g, **d)
    t = torch.rand(T * B, generator=g, **d).clamp_min(0.01)
    v_ref, v_ema = torch.randn(T * B, 2, 4, 4, generator=g, **d), torch.randn(T * B, 2, 4, 4, generator=g, **d)
    raw_adv = torch.tensor([-7.0, -1.0, 0.5, 6.0], **d)  # two beyond ±5: clipped
    # off-policy (π_old ≠ π_θ), so the ratio moves off 1 and the clip bites
    v = (noise - clean + 0.3 * torch.randn(T * B, 2, 4, 4, generator=g, **d)).requires_grad_(True)
    v_old = v.detach() + 0.2 * torch.randn(T * B, 2, 4, 4, generator=g, **d)

    old_rel, _ = _released_log_prob(v_old, clean, noise, t.view(-1, 1, 1, 1), weighting)
    log_rel, out_rel = _released_log_prob(v, clean, noise, t.view(-1, 1, 1, 1), weighting)
    released = _released_loss(log_rel, old_rel, raw_adv, out_rel, v_ref, v_ema, T, B, 5.0, 1.0, clip_range, beta,
                              ema_beta)
    (grad_rel,) = torch.autograd.grad(released, v)

    w = OURS[weighting]
    old = awm_log_prob(v_old, noise - clean, t, weighting=w, power=GHUBER_POWER)
    torch.testing.assert_close(old, old_rel, rtol=0, atol=1e-14)
    adv = raw_adv.clamp(-5.0, 5.0) * (1.0 / 5.0)  # the rule's scaling, rows draw-major
    losses, stats = awm_loss(v, noise - clean, t, adv.repeat(T), old, weighting=w, power=GHUBER_POWER,
                             clip_range=clip_range, v_ref=v_ref, beta=beta, v_old=v_ema, old_beta=ema_beta)
    assert losses.shape == (T * B,)
    (grad,) = torch.autograd.grad(losses.mean(), v)
    torch.testing.assert_close(losses.mean(), released, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_rel, rtol=1e-10, atol=1e-14)
    assert 0 < float(stats["clip_fraction"]) < 1


def test_on_policy_gradient_is_advantage_weighted_matching():
    # ratio = 1: ∇L = −A·∇log p; uniform weighting, one element: log p = −(v − u)², ∇_v = 2A(v − u)
    v = torch.tensor([[[[1.5]]], [[[0.0]]]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[[[1.0]]], [[[1.0]]]], dtype=torch.float64)
    a, t = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    old = awm_log_prob(v.detach(), u, t, weighting="uniform")
    losses, stats = awm_loss(v, u, t, a, old, weighting="uniform")
    losses.sum().backward()
    # sample 0: 2·2·(1.5 − 1) = 2; sample 1: 2·(−1)·(0 − 1) = 2
    torch.testing.assert_close(v.grad.flatten(), torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert float(stats["ratio_mean"]) == 1.0
    with pytest.raises(ValueError, match="valid: uniform, t, t2, huber, ghuber"):
        awm_log_prob(v, u, t, weighting="cubic")


REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])


def _learner(mbs: int) -> Learner:
    s = LearnerSettings(objective="awm", awm=AWMParams(t_samples=2), micro_batch_size=mbs, lr=1e-3)
    return Learner(tiny_velocity(), table_encode, s)


def test_learner_update_trains_and_micro_batching_does_not_change_it():
    one, cut = _learner(16), _learner(5)  # 8 rollouts × 2 times = 16 rows: one micro-batch, or 5 + 5 + 5 + 1
    before = {k: v.clone() for k, v in one.policy.state_dict().items()}
    s1, s2 = one.update(fake_batch(), REWARDS), cut.update(fake_batch(), REWARDS)
    assert s1["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # π_old is π_θ on the first update
    moved = [k for k, v in one.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert moved
    for (n, pa), (_, pb) in zip(one.policy.named_parameters(), cut.policy.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-4, abs=1e-7)


def test_config_maps_to_params():
    s = load_config("configs/digits_awm.yaml", ["algorithm.awm.weighting=huber"]).learner_settings()
    assert s.objective == "awm"
    assert s.awm == dataclasses.replace(AWMParams(), weighting="huber", tracker=s.awm.tracker)

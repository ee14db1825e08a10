"""DiffusionNFT as released (NVlabs/DiffusionNFT): our functions against float64 transcriptions.

Each ``_release_*`` function below restates, in plain tensor code of this file, one formula of
the released training script ``scripts/train_nft_sd3.py`` (line numbers in the docstrings); the
project's implementation must give the same numbers on the same tensors (~1e-12 in float64).
The last tests run the released loss end to end through the learner on a tiny digits-shaped
policy and check its loss, its gradient and the old policy's soft update against the
transcription.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from learner.advantages import clip_advantages
from learner.learner import Learner, LearnerSettings
from learner.objectives.diffusion_nft import (
    diffusion_nft_released_loss,
    nft_optimality,
    nft_training_times,
)
from learner.pretrain import rollout_ema_decay
from learner.settings import DiffusionNFTParams
from samplers.digits import IMAGE_SHAPE, to_uint8
from samplers.flow import sampling_sigmas
from samplers.sampler import Sampler
from tests.helpers import table_encode, tiny_velocity

F64 = torch.float64


# ---- transcriptions of the release ------------------------------------------------------------

def _release_loss(v_theta, v_old, v_ref, x_t, t, x0, advantages, *, beta, adv_clip_max, kl_beta):
    """The step's loss, scripts/train_nft_sd3.py:910–970 (adv_mode "all"), for one micro-batch
    and one time index: advantages clamped to ±adv_clip_max, r = clamp(A/A_max/2 + 0.5, 0, 1);
    positive = β·v_θ + (1 − β)·v_old, negative = (1 + β)·v_old − β·v_θ; each x0 prediction
    xt − t·v divided elementwise by its no-grad per-sample mean |x0̂ − x0| (float64, clipped
    at 1e-5) and averaged per sample; (r·pos/β + (1 − r)·neg/β)·A_max averaged over the batch,
    plus kl_beta times the batch mean of the per-sample mean (v_θ − v_ref)²."""
    dims = tuple(range(1, x0.ndim))
    a = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    r = torch.clamp(a / adv_clip_max / 2.0 + 0.5, 0, 1)
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    out = []
    for v in (beta * v_theta + (1 - beta) * v_old, (1.0 + beta) * v_old - beta * v_theta):
        pred = x_t - tt * v
        with torch.no_grad():
            w = (pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=0.00001)
        out.append(((pred - x0) ** 2 / w).mean(dim=dims))
    per_sample = r * out[0] / beta + (1.0 - r) * out[1] / beta
    policy = (per_sample * adv_clip_max).mean()
    kl = ((v_theta - v_ref) ** 2).mean(dim=dims)
    return policy + kl_beta * kl.mean(), per_sample * adv_clip_max


def _release_decay(step: int, decay_type: int) -> float:
    """``return_decay``, scripts/train_nft_sd3.py:169–189."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def _release_times(timesteps: torch.Tensor, samples: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    """scripts/train_nft_sd3.py:569 and 807–816: a randperm of the K timesteps per sample (in
    sample order), the first int(K·timestep_fraction) columns used."""
    k = timesteps.numel()
    used = int(k * fraction)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(samples)])
    return timesteps.repeat(samples, 1)[torch.arange(samples)[:, None], perm][:, :used]


def _release_tracker(prompts: list[str], rewards: torch.Tensor, global_std: bool) -> torch.Tensor:
    """A freshly cleared ``PerPromptStatTracker.update`` (flow_grpo/stat_tracking.py:12–32)."""
    out = torch.zeros_like(rewards)
    for p in sorted(set(prompts)):
        mask = torch.tensor([q == p for q in prompts])
        mine = rewards[mask]
        std = (rewards if global_std else mine).std(correction=0) + 1e-4
        out[mask] = (mine - mine.mean()) / std
    return out


# ---- the formulas -----------------------------------------------------------------------------

def _tensors(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 3, 3)
    x0, eps, v_old, v_ref = (torch.randn(shape, generator=g, dtype=F64) for _ in range(4))
    v_theta = v_old + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor([1.0, 0.7, 0.4, 0.1, 0.001], dtype=F64)[:n]
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    adv = torch.tensor([-7.0, -2.0, 0.0, 1.5, 6.0], dtype=F64)[:n]  # two beyond ±5
    return v_theta, v_old, v_ref, x_t, t, x0, adv


@pytest.mark.parametrize(("beta", "kl_beta"), [(1.0, 1e-4), (0.1, 1e-4), (0.5, 0.0)])
def test_released_loss_and_gradient_equal_the_release(beta, kl_beta):
    v_theta, v_old, v_ref, x_t, t, x0, adv = _tensors()
    # one sample whose x0 predictions are within ~1e-8 of x0: the 1e-5 floor of the weight binds
    v_theta[2] = v_old[2] = (x_t[2] - x0[2]) / t[2] + 1e-8
    v1 = v_theta.clone().requires_grad_(True)
    expected, per_sample = _release_loss(v1, v_old, v_ref, x_t, t, x0, adv, beta=beta, adv_clip_max=5.0,
                                         kl_beta=kl_beta)
    v2 = v_theta.clone().requires_grad_(True)
    a, _ = clip_advantages(adv, 5.0)
    losses, stats = diffusion_nft_released_loss(v2, v_old, x_t, t, x0, nft_optimality(a, 5.0), beta=beta,
                                                a_max=5.0, v_ref=v_ref, ref_weight=kl_beta)
    assert losses.dtype == F64
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-12, atol=1e-14)
    ref_term = kl_beta * ((v_theta - v_ref) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses - ref_term, per_sample.detach(), rtol=1e-12, atol=1e-14)
    expected.backward()
    losses.mean().backward()
    torch.testing.assert_close(v2.grad, v1.grad, rtol=1e-12, atol=1e-14)
    assert float(stats["pos_weight"]) > 0 and float(stats["r_mean"]) == pytest.approx(float(
        nft_optimality(a, 5.0).mean()))


def test_released_loss_hand_computed_floor():
    # one sample, one element, t = 0.5, x_t = 1, x0 = 0, β = 1, A_max = 5, r = 1 (A = 5):
    # v_θ = 2 → x0̂⁺ = 1 − 0.5·2 = 0 = x0: weight floor 1e-5, pos = 0² / 1e-5 = 0
    # v_old = 1 → v⁻ = 2·1 − 2 = 0 → x0̂⁻ = 1, neg = 1/1 = 1 but r = 1 ignores it → ℓ = 0
    # with r = 0.5 (A = 0): ℓ = 5·(0.5·0 + 0.5·1) = 2.5
    one = lambda x: torch.tensor([x], dtype=F64).view(1, 1, 1, 1)  # noqa: E731
    args = (one(2.0), one(1.0), one(1.0), torch.tensor([0.5], dtype=F64), one(0.0))
    for r, want in ((1.0, 0.0), (0.5, 2.5)):
        losses, stats = diffusion_nft_released_loss(*args, torch.tensor([r], dtype=F64), beta=1.0, a_max=5.0)
        assert float(losses[0]) == pytest.approx(want, abs=1e-15)
        assert float(stats["pos_weight"]) == 1e-5 and float(stats["neg_weight"]) == 1.0


def test_released_loss_refuses_bad_arguments():
    v_theta, v_old, v_ref, x_t, t, x0, _ = _tensors()
    r = torch.full((5,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="needs v_ref"):
        diffusion_nft_released_loss(v_theta, v_old, x_t, t, x0, r, ref_weight=1e-4)
    with pytest.raises(ValueError, match="a_max"):
        diffusion_nft_released_loss(v_theta, v_old, x_t, t, x0, r, a_max=0.0)
    with pytest.raises(ValueError, match=r"t must be \(B,\)"):
        diffusion_nft_released_loss(v_theta, v_old, x_t, t[:3], x0, r)


@pytest.mark.parametrize(("schedule", "decay_type"), [("nft_decay0", 0), ("nft_decay1", 1), ("nft_decay2", 2)])
def test_decay_schedules_equal_the_release(schedule, decay_type):
    for step in range(0, 1200):
        assert rollout_ema_decay(schedule, step, 0.9) == _release_decay(step, decay_type), step
    assert rollout_ema_decay("constant", 7, 0.9) == 0.9
    # the ends: type 1 reaches 0.5 at step 500; type 2 is 0 until 75, then 0.0075 per step to 0.999
    assert rollout_ema_decay("nft_decay1", 500, 0.0) == 0.5
    assert rollout_ema_decay("nft_decay2", 76, 0.0) == pytest.approx(0.0075)
    with pytest.raises(ValueError, match="unknown EMA schedule"):
        rollout_ema_decay("cosine", 1, 0.9)  # type: ignore[arg-type]


def test_grid_times_equal_the_release_draw():
    grid = sampling_sigmas(10, shift=3.0)  # (11,) ending at 0: the release trains on the first 10
    ours = nft_training_times(grid, 6, 0.99, torch.Generator().manual_seed(5))
    theirs = _release_times(grid[:-1], 6, 0.99, torch.Generator().manual_seed(5))
    assert ours.shape == (6, 9)  # int(10·0.99) = 9 of the 10 grid times per sample
    assert torch.equal(ours, theirs)
    for row in ours:  # distinct times of the grid, never its terminal 0
        assert len(set(row.tolist())) == 9 and set(row.tolist()) <= set(grid[:-1].tolist())
    # one step: the release's int(1·0.99) = 0 would train on nothing; we keep one time
    assert nft_training_times(torch.tensor([1.0, 0.0]), 3, 0.99).tolist() == [[1.0]] * 3
    with pytest.raises(ValueError, match="fraction"):
        nft_training_times(grid, 2, 0.0)


# ---- through the learner ----------------------------------------------------------------------

PROMPTS = ["a handwritten one", "a handwritten two"]
REWARDS = torch.tensor([0.9, 0.1, 0.4, 0.4, 0.2, 0.7, 0.5, 0.3])


def _nft_learner(**kw) -> Learner:
    s = LearnerSettings(objective="diffusion_nft", lr=1e-2, warmup_steps=0, micro_batch_size=10, seed=3,
                        diffusion_nft=DiffusionNFTParams(), rollout_update="ema",
                        rollout_ema_schedule="nft_decay1", rollout_ema_every="refresh")
    return Learner(tiny_velocity(), table_encode, dataclasses.replace(s, **kw))


def _rollouts():
    sampler = Sampler(tiny_velocity(1), table_encode, to_uint8, IMAGE_SHAPE, num_steps=4)
    return sampler.rollout(PROMPTS, 4, [1, 2])


def test_released_update_end_to_end():
    # one learner update of the released defaults (batch tracker, grid times, x0-space loss with
    # the reference term, decay_type 1 once per epoch) against the transcription on the same draws
    traj = _rollouts()
    ln = _nft_learner()
    policy0 = copy.deepcopy(ln.policy)
    old0 = copy.deepcopy(ln.rollout)
    g = torch.Generator()
    g.set_state(ln.generator.get_state())
    stats = ln.update(traj, REWARDS)

    # the same draws: 3 of 4 grid times per sample, then fresh noise per (sample, time)
    t = _release_times(traj.times[:-1], 8, 0.99, g)
    m = t.shape[1]
    assert m == 3
    eps = torch.randn((8, m, *IMAGE_SHAPE), generator=g)
    x0 = traj.samples.repeat_interleave(m, 0)
    t, eps = t.reshape(-1), eps.flatten(0, 1)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    adv = _release_tracker(traj.prompt_list(), REWARDS.double(), global_std=True).float().repeat_interleave(m)
    cond = table_encode(traj.prompt_list()).index(torch.arange(8).repeat_interleave(m))
    with torch.no_grad():
        v_old, v_ref = old0(x_t, t, cond), ln.reference(x_t, t, cond)
    loss, _ = _release_loss(policy0(x_t, t, cond), v_old, v_ref, x_t, t, x0, adv, beta=1.0, adv_clip_max=5.0,
                            kl_beta=1e-4)
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.nn.utils.clip_grad_norm_(policy0.parameters(), 1.0)
    for (n, p0), p in zip(policy0.named_parameters(), ln.policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p0.grad, rtol=1e-4, atol=1e-7, msg=n)
    # π_old ← d·π_old + (1 − d)·π_θ with d = min(0.001·1, 0.5) after the epoch's one step
    for po, pt, pr in zip(old0.parameters(), ln.policy.parameters(), ln.rollout.parameters(), strict=True):
        torch.testing.assert_close(pr, 0.001 * po + 0.999 * pt, rtol=1e-6, atol=1e-7)


def test_ema_once_per_refresh_and_batch_tracker_resume(tmp_path):
    # refresh every 2 steps: π_old stays put after step 1 and takes one EMA step, d = 0.002, at step 2;
    # the batch tracker has no buffers, and a checkpoint taken between the two resumes bit for bit
    traj = _rollouts()
    kw = {"rollout_refresh_every": 2, "micro_batch_size": 16, "diffusion_nft": DiffusionNFTParams(timestep_fraction=0.5)}
    ln = _nft_learner(**kw)
    old0 = [p.detach().clone() for p in ln.rollout.parameters()]
    ln.update(traj, REWARDS)
    assert all(torch.equal(a, b) for a, b in zip(old0, ln.rollout.parameters(), strict=True))
    assert ln.rule.tracker.state_dict() == {"mode": "batch", "global_std": True, "eps": 1e-4}
    ln.save(tmp_path / "ck")
    resumed = _nft_learner(**kw)
    resumed.load(tmp_path / "ck")
    assert ln.update(traj, REWARDS.flip(0)) == resumed.update(traj, REWARDS.flip(0))
    for po, pt, pr, qr in zip(old0, ln.policy.parameters(), ln.rollout.parameters(), resumed.rollout.parameters(),
                              strict=True):
        torch.testing.assert_close(pr, 0.002 * po + 0.998 * pt, rtol=1e-6, atol=1e-7)
        assert torch.equal(pr, qr)
    # a buffer-tracker learner refuses the batch tracker's checkpoint: first the learner, naming the
    # setting, and the tracker itself when handed the state
    other = _nft_learner(**{**kw, "diffusion_nft": DiffusionNFTParams(
        timestep_fraction=0.5, tracker=dataclasses.replace(DiffusionNFTParams().tracker, mode="buffer"))})
    with pytest.raises(ValueError, match=r"diffusion_nft\.tracker\.mode: batch → buffer"):
        other.load(tmp_path / "ck")
    with pytest.raises(ValueError, match="saved by a 'batch' tracker"):
        other.rule.tracker.load_state_dict(ln.rule.tracker.state_dict())


def test_configs_map_to_the_release_and_the_velocity_variant():
    from services.config import load_config

    s = load_config("configs/digits_diffusion_nft.yaml").learner_settings()
    assert s.diffusion_nft == DiffusionNFTParams()  # the released defaults
    assert (s.rollout_update, s.rollout_ema_schedule, s.rollout_ema_every) == ("ema", "nft_decay1", "refresh")
    assert (s.lr, s.weight_decay, s.warmup_steps, s.grad_clip) == (3e-4, 1e-4, 0, 1.0)
    v = load_config("configs/digits_diffusion_nft_velocity.yaml").learner_settings()
    assert (v.diffusion_nft.loss, v.diffusion_nft.times, v.diffusion_nft.ref_weight) == ("velocity", "uniform", 0.0)
    assert (v.diffusion_nft.tracker.mode, v.rollout_ema_schedule, v.rollout_ema_every) == ("buffer", "constant", "step")

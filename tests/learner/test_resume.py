"""Checkpoints resume bitwise: 4 updates in one go equal 2, save, a fresh learner's load, 2 more."""

import dataclasses

import pytest
import torch

from learner.learner import Learner, LearnerSettings
from learner.settings import ACFlowParams, FlowGRPOParams, TrackerParams
from tests.helpers import fake_batch, table_encode, tiny_velocity

REWARDS = [
    torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]),
    torch.tensor([0.6, 0.2, 0.9, 0.1, 0.3, 0.5, 0.4, 0.8]),
    torch.tensor([0.2, 0.4, 0.1, 0.7, 0.9, 0.6, 0.3, 0.5]),
    torch.tensor([0.8, 0.3, 0.6, 0.2, 0.1, 0.9, 0.7, 0.4]),
]
# small tracker buffers, so that per-prompt statistics (not the batch fallback) are used by
# the time of the checkpoint and the saved buffers matter
TRACKER = TrackerParams(buffer_size=8, min_count=4, global_std=True)

SETTINGS = {
    "orw_cfm_w2": {"rollout_refresh_every": 3},
    # the critic warm-up ends at step 3, after the checkpoint at step 2
    "ac_flow": {"ac_flow": ACFlowParams(warmup_steps=3, warmup_actor="orw", tracker=TRACKER)},
    # the config's default (make run's): grid times, centred weights, the W2 term to an EMA π_old
    "ac_flow-grid": {"rollout_update": "ema", "ac_flow": ACFlowParams(
        warmup_steps=3, warmup_actor="orw", times="grid", centre_weights=True, anchor="rollout", alpha=1.0,
        tracker=TRACKER)},
    "advantage_flow": {"rollout_update": "ema", "rollout_refresh_every": 3,
                       "advantage_flow": dataclasses.replace(LearnerSettings().advantage_flow, tracker=TRACKER)},
    "diffusion_nft": {"rollout_update": "ema",
                      "diffusion_nft": dataclasses.replace(LearnerSettings().diffusion_nft, tracker=TRACKER)},
    "flow_grpo": {"flow_grpo": FlowGRPOParams(clip_eps=0.2, tracker=TRACKER), "micro_batch_size": 10},
}


def _learner(case: str) -> Learner:
    # lr warm-up of 3 steps: the checkpoint falls inside the LambdaLR ramp; a case names its objective
    settings = dataclasses.replace(LearnerSettings(), objective=case.split("-")[0], lr=1e-2, warmup_steps=3, seed=3,
                                   **SETTINGS[case])
    return Learner(tiny_velocity(), table_encode, settings)


def _batches(objective: str) -> list:
    if objective != "flow_grpo":
        return [fake_batch(seed=10 + i, version=i) for i in range(4)]
    from samplers.digits import IMAGE_SHAPE, to_uint8
    from samplers.sampler import Sampler

    torch.manual_seed(0)
    sampler = Sampler(tiny_velocity(), table_encode, to_uint8, IMAGE_SHAPE, num_steps=3, kind="sde", sde_a=0.7)
    return [sampler.rollout(["a handwritten one", "a handwritten two"], 4, [1, 2]) for _ in range(4)]


def _assert_same(a: torch.nn.Module, c: torch.nn.Module) -> None:
    for (n, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(pa, pc), n


@pytest.mark.parametrize("objective", list(SETTINGS))
def test_resume_is_bitwise_identical(objective, tmp_path):
    batches = _batches(objective)

    a = _learner(objective)
    rng = torch.get_rng_state()
    stats_a = [a.update(b, r) for b, r in zip(batches, REWARDS, strict=True)]
    # updates draw only from the learner's generator: the global RNG is not checkpointed
    assert torch.equal(torch.get_rng_state(), rng)

    b = _learner(objective)
    for batch, r in zip(batches[:2], REWARDS[:2], strict=True):
        b.update(batch, r)
    b.save(tmp_path / "ck")
    saved = (b.step, b.version)
    del b

    torch.manual_seed(1234)  # a different global RNG state must not matter either
    c = _learner(objective)
    c.load(tmp_path / "ck")
    assert (c.step, c.version) == saved
    stats_c = [c.update(batch, r) for batch, r in zip(batches[2:], REWARDS[2:], strict=True)]

    assert stats_c == stats_a[2:]
    assert (c.step, c.version) == (a.step, a.version)
    _assert_same(a.policy, c.policy)
    _assert_same(a.rollout, c.rollout)
    assert torch.equal(a.generator.get_state(), c.generator.get_state())
    assert c.scheduler.state_dict() == a.scheduler.state_dict()
    if objective == "ac_flow":
        assert [s["warmup"] for s in stats_a] == [1.0, 1.0, 1.0, 0.0]
        _assert_same(a.rule.critic, c.rule.critic)
    if objective != "orw_cfm_w2":
        assert c.rule.tracker.state_dict() == a.rule.tracker.state_dict()
        assert stats_a[3]["adv_std"] > 0


def test_load_refuses_another_objectives_checkpoint(tmp_path):
    a = _learner("orw_cfm_w2")
    a.update(fake_batch(), REWARDS[0])
    a.save(tmp_path / "ck")
    c = _learner("ac_flow")
    before = {k: v.clone() for k, v in c.policy.state_dict().items()}
    with pytest.raises(ValueError, match="written by objective 'orw_cfm_w2', this learner runs 'ac_flow'"):
        c.load(tmp_path / "ck")
    assert c.step == 0
    assert all(torch.equal(v, c.policy.state_dict()[k]) for k, v in before.items())


def test_load_refuses_another_reference(tmp_path):
    a = _learner("orw_cfm_w2")
    a.save(tmp_path / "ck")
    other = Learner(tiny_velocity(seed=1), table_encode, a.settings)
    with pytest.raises(ValueError, match="another reference policy"):
        other.load(tmp_path / "ck")


def test_load_applies_a_changed_learning_rate_and_keeps_the_schedule(tmp_path):
    """A learner built with another lr than its checkpoint's continues with the new base rate
    (what `--resume --set learner.lr=…` asks), not the optimiser state's: AdamW's step is
    lr · m̂/(√v̂ + ε) (weight decay 0), so from the same moments and gradient the step with half
    the lr is half the step."""
    batches = [fake_batch(seed=10 + i, version=i) for i in range(3)]
    a = _learner("orw_cfm_w2")
    for batch, r in zip(batches[:2], REWARDS[:2], strict=True):
        a.update(batch, r)
    a.save(tmp_path / "ck")
    start = {k: v.clone() for k, v in a.policy.named_parameters()}

    same = _learner("orw_cfm_w2")
    same.load(tmp_path / "ck")
    half = Learner(tiny_velocity(), table_encode, dataclasses.replace(same.settings, lr=5e-3))
    half.load(tmp_path / "ck")
    # LambdaLR at step 2 of a 3-step warm-up: factor min(1, (2 + 1)/3) = 1
    assert half.scheduler.base_lrs == [5e-3] and half.scheduler.get_last_lr() == [5e-3]
    assert [g["lr"] for g in half.optimizer.param_groups] == [5e-3]
    assert [g["initial_lr"] for g in half.optimizer.param_groups] == [5e-3]
    assert same.scheduler.base_lrs == [1e-2]  # an unchanged lr leaves the loaded state as it was
    s_same = same.update(batches[2], REWARDS[2])
    s_half = half.update(batches[2], REWARDS[2])
    assert (s_same["lr"], s_half["lr"]) == (1e-2, 5e-3)
    for (n, p_same), (_, p_half) in zip(same.policy.named_parameters(), half.policy.named_parameters(), strict=True):
        if p_same.requires_grad:
            torch.testing.assert_close(p_half - start[n], 0.5 * (p_same - start[n]), rtol=1e-3, atol=1e-8)
    assert any(not torch.equal(p, start[n]) for n, p in same.policy.named_parameters())


def test_a_checkpoint_is_not_continued_under_other_learner_settings(tmp_path):
    """A changed objective setting (a new default after an upgrade included) is refused on load,
    naming it; the learning rate may change; settings an older file lacks count as changed."""
    import json as _json

    from learner.learner import _check_settings_kept
    from learner.rules import settings_json
    from learner.settings import DiffusionNFTParams, LearnerSettings

    s = LearnerSettings(objective="diffusion_nft")
    saved = _json.loads(settings_json(s))
    _check_settings_kept(saved, _json.loads(settings_json(LearnerSettings(objective="diffusion_nft", lr=1e-3))), tmp_path)
    other = LearnerSettings(objective="diffusion_nft", diffusion_nft=DiffusionNFTParams(beta=0.5))
    with pytest.raises(ValueError, match=r"diffusion_nft\.beta: 1\.0 → 0\.5"):
        _check_settings_kept(saved, _json.loads(settings_json(other)), tmp_path)
    del saved["diffusion_nft"]["loss"]  # a file written before the released loss existed
    with pytest.raises(ValueError, match=r"diffusion_nft\.loss: absent → released"):
        _check_settings_kept(saved, _json.loads(settings_json(s)), tmp_path)
    # another objective's section is not this run's business
    saved = _json.loads(settings_json(s))
    del saved["flow_grpo"]
    _check_settings_kept(saved, _json.loads(settings_json(s)), tmp_path)

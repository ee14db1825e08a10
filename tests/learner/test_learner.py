"""The learner: accumulation invariance, refresh every H, publishing, checkpoint round trip."""

import dataclasses

import pytest
import torch

from learner.learner import Learner, LearnerSettings
from learner.settings import ORWParams
from samplers.policy import state_checksum
from tests.helpers import fake_batch, table_encode, tiny_velocity

REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])


def _learner(coupling="independent", **kw) -> Learner:
    settings = dataclasses.replace(LearnerSettings(orw=ORWParams(coupling=coupling)), **kw)
    return Learner(tiny_velocity(), table_encode, settings)


@pytest.mark.parametrize("coupling", ["independent", "minibatch_ot"])
def test_micro_batching_does_not_change_the_update(coupling):
    # 8 rows in one micro-batch vs 4 micro-batches of 2 (gradient accumulation): same parameters
    a, b = _learner(micro_batch_size=8, coupling=coupling), _learner(micro_batch_size=2, coupling=coupling)
    batch = fake_batch()
    sa, sb = a.update(batch, REWARDS), b.update(batch, REWARDS)
    for (n, pa), (_, pb) in zip(a.policy.named_parameters(), b.policy.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5)


def test_rollout_policy_refreshes_every_h_steps_and_reference_stays():
    ln = _learner(rollout_refresh_every=3, lr=1e-2)
    ref0 = state_checksum(ln.reference.state_dict())
    published = []
    for i in range(7):
        ln.update(fake_batch(seed=i), REWARDS)
        published.append(ln.publish().version)
    assert published == [0, 0, 3, 3, 3, 6, 6]
    assert state_checksum(ln.reference.state_dict()) == ref0
    assert state_checksum(ln.rollout.state_dict()) != state_checksum(ln.policy.state_dict())
    cur = ln.publish(current=True)
    assert cur.version == 7 and cur.checksum == state_checksum(ln.policy.state_dict())


def test_bad_rewards_are_refused():
    ln = _learner()
    with pytest.raises(ValueError, match="non-finite"):
        ln.update(fake_batch(), torch.tensor([0.0, float("nan")] + [0.0] * 6))
    with pytest.raises(ValueError, match="expected 8 rewards"):
        ln.update(fake_batch(), torch.zeros(5))
    assert ln.step == 0


def test_checkpoint_round_trip(tmp_path):
    a = _learner(lr=1e-2, rollout_refresh_every=2)
    for i in range(3):
        a.update(fake_batch(seed=i), REWARDS)
    a.save(tmp_path / "ck")
    b = _learner(lr=1e-2, rollout_refresh_every=2)
    b.load(tmp_path / "ck")
    assert (b.step, b.version) == (3, 2)
    assert state_checksum(b.policy.state_dict()) == state_checksum(a.policy.state_dict())
    assert state_checksum(b.rollout.state_dict()) == state_checksum(a.rollout.state_dict())
    # the restored optimiser continues exactly like the original
    b.generator.set_state(a.generator.get_state())
    a.update(fake_batch(seed=9), REWARDS)
    b.update(fake_batch(seed=9), REWARDS)
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    (tmp_path / "ck" / "optimizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.safetensors missing"):
        b.load(tmp_path / "ck")


def test_pretraining_is_deterministic():
    from learner.pretrain import PretrainSettings, pretrain_flow_matching

    data = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = table_encode(["a handwritten one", "a handwritten two"] * 8)
    settings = PretrainSettings(steps=4, batch_size=8, warmup_steps=2)
    a = pretrain_flow_matching(tiny_velocity(), data, cond, table_encode([""]), settings)
    b = pretrain_flow_matching(tiny_velocity(), data, cond, table_encode([""]), settings)
    assert state_checksum(a.state_dict()) == state_checksum(b.state_dict())
    assert state_checksum(a.state_dict()) != state_checksum(tiny_velocity().state_dict())


@pytest.mark.parametrize("objective", ["ac_flow", "advantage_flow", "diffusion_nft"])
def test_every_objective_is_micro_batch_invariant_and_moves_the_policy(objective):
    # 8 rows at once vs 4 micro-batches of 2: the same parameters (tolerance 1e-5 relative)
    kw = {"objective": objective, "lr": 1e-2}
    if objective == "ac_flow":
        kw["ac_flow"] = dataclasses.replace(LearnerSettings().ac_flow, warmup_steps=0)
    if objective != "orw_cfm_w2":
        kw["rollout_update"] = "ema"
    a, b = _learner(micro_batch_size=8, **kw), _learner(micro_batch_size=2, **kw)
    before = state_checksum(a.policy.state_dict())
    for i in range(2):
        a.update(fake_batch(seed=i), REWARDS)
        b.update(fake_batch(seed=i), REWARDS)
    assert state_checksum(a.policy.state_dict()) != before
    for (n, pa), (_, pb) in zip(a.policy.named_parameters(), b.policy.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_ac_flow_warmup_trains_only_the_critic():
    ln = _learner(objective="ac_flow", lr=1e-2, ac_flow=dataclasses.replace(LearnerSettings().ac_flow, warmup_steps=2))
    p0, c0 = state_checksum(ln.policy.state_dict()), state_checksum(ln.rule.critic.state_dict())
    s = ln.update(fake_batch(), REWARDS)
    assert s["warmup"] == 1.0 and s["grad_norm"] == 0.0
    assert state_checksum(ln.policy.state_dict()) == p0 and state_checksum(ln.rule.critic.state_dict()) != c0
    ln.update(fake_batch(seed=1), REWARDS)
    s = ln.update(fake_batch(seed=2), REWARDS)  # step 2: warm-up over, the actor moves
    assert s["warmup"] == 0.0 and state_checksum(ln.policy.state_dict()) != p0


def test_ac_flow_checkpoint_restores_critic_and_tracker(tmp_path):
    kw = {"objective": "ac_flow", "lr": 1e-2, "ac_flow": dataclasses.replace(LearnerSettings().ac_flow, warmup_steps=1)}
    a = _learner(**kw)
    for i in range(3):
        a.update(fake_batch(seed=i), REWARDS)
    a.save(tmp_path / "ck")
    b = _learner(**kw)
    b.load(tmp_path / "ck")
    assert state_checksum(b.rule.critic.state_dict()) == state_checksum(a.rule.critic.state_dict())
    assert b.rule.tracker.state_dict() == a.rule.tracker.state_dict()
    b.generator.set_state(a.generator.get_state())
    sa, sb = a.update(fake_batch(seed=7), REWARDS), b.update(fake_batch(seed=7), REWARDS)
    assert sa == sb
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_flow_grpo_on_recorded_sde_rollouts():
    from learner.settings import FlowGRPOParams
    from samplers.digits import IMAGE_SHAPE, to_uint8
    from samplers.sampler import Sampler

    sampler = Sampler(tiny_velocity(), table_encode, to_uint8, IMAGE_SHAPE, num_steps=3, kind="sde", sde_a=0.7)
    traj = sampler.rollout(["a handwritten one", "a handwritten two"], 4, [1, 2])
    assert traj.log_probs.shape == (8, 3)
    params = FlowGRPOParams(sde_a=0.7, clip_eps=0.2, kl_beta=0.04)
    a = _learner(objective="flow_grpo", flow_grpo=params, micro_batch_size=24, lr=1e-2)
    b = _learner(objective="flow_grpo", flow_grpo=params, micro_batch_size=5, lr=1e-2)
    # same weights as the sampler: every ratio is exactly 1 on the first step
    sa = a.update(traj, REWARDS)
    assert sa["grad_norm"] > 0 and sa["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and sa["clip_fraction"] == 0
    b.update(traj, REWARDS)
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    ode = Sampler(tiny_velocity(), table_encode, to_uint8, IMAGE_SHAPE, num_steps=3).rollout(["a handwritten one"], 8, [1])
    with pytest.raises(ValueError, match="needs SDE rollouts"):
        a.update(ode, REWARDS)


def test_gradient_checkpointing_changes_memory_not_the_update():
    # diffusers' own switch on the transformer: the block activations are recomputed in the
    # backward pass, and the update is the same (up to float32 recomputation order)
    a, b = _learner(lr=1e-2), _learner(lr=1e-2)
    b.policy.transformer.enable_gradient_checkpointing()
    assert b.policy.transformer.is_gradient_checkpointing and not a.policy.transformer.is_gradient_checkpointing


    def saved_bytes(ln: Learner) -> int:  # what the trained forward keeps for the backward pass
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        batch = fake_batch()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ln.policy(batch.samples, torch.full((batch.size,), 0.5), table_encode(batch.prompt_list()))
        return total[0]

    assert saved_bytes(b) < saved_bytes(a) / 3  # measured: 17 kB against 91 kB
    sa, sb = a.update(fake_batch(), REWARDS), b.update(fake_batch(), REWARDS)
    assert sa["grad_norm"] > 0
    for (n, pa), (_, pb) in zip(a.policy.named_parameters(), b.policy.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=n)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-6)

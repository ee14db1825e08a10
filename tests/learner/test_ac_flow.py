"""AC-Flow's reconstructed parts on hand-computed numbers, and its ORW special case."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from learner.critic import ValueCritic
from learner.learner import Learner, LearnerSettings
from learner.objectives.ac_flow import (
    ac_flow_actor_loss,
    critic_regression_loss,
    critic_weights,
    explained_variance_by_t,
    implicit_velocity,
)
from learner.objectives.orw import orw_cfm_w2_loss
from learner.settings import ACFlowParams
from samplers.digits import DIGITS_TRANSFORMER_CONFIG
from samplers.policy import build_sd3_velocity
from services.config import ConfigError, load_config
from tests.helpers import fake_batch, table_encode, tiny_velocity

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


# ---- the critic's levers: LayerNorm, several t per sample, recorded states, fit by t ----------

def _ac_learner(**kw) -> Learner:
    ac = dataclasses.replace(ACFlowParams(warmup_steps=0), **kw)
    return Learner(tiny_velocity(), table_encode, LearnerSettings(objective="ac_flow", ac_flow=ac, micro_batch_size=8))


REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])


def test_critic_layer_norm_option():
    plain, normed = ValueCritic(1, 384), ValueCritic(1, 384, norm="layer")
    # "none" keeps the modules (and checkpoint keys) of the critic before the option existed
    assert not any(isinstance(m, nn.LayerNorm) for m in plain.modules())
    assert sorted(k for k in plain.state_dict() if "features" in k or "head" in k or "time" in k) == [
        "features.0.bias", "features.0.weight", "features.2.bias", "features.2.weight", "features.6.bias",
        "features.6.weight", "head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight", "time.0.bias",
        "time.0.weight"]
    assert sum(isinstance(m, nn.LayerNorm) for m in normed.modules()) == 3  # features, time, head
    assert normed(torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 384)).shape == (3,)
    with pytest.raises(ValueError, match="valid: none, layer"):
        ValueCritic(1, 384, norm="batch")


def test_explained_variance_by_t_hand_computed():
    # bucket 0 (t < 0.25): r̃ = (0, 2), V = (0, 1): Var(r̃) = 1, r̃ − V = (0, 1), Var = 0.25 → 0.75;
    # bucket 1 empty, bucket 2 one row, bucket 3 equal targets (t = 1 falls in the last): all 0.0
    t = torch.tensor([0.1, 0.2, 0.6, 0.8, 1.0])
    targets = torch.tensor([0.0, 2.0, 1.0, 0.5, 0.5])
    values = torch.tensor([0.0, 1.0, 0.3, 0.1, 0.9])
    ev = explained_variance_by_t(values, targets, t)
    assert ev == {"explained_variance_t0": pytest.approx(0.75), "explained_variance_t1": 0.0,
                  "explained_variance_t2": 0.0, "explained_variance_t3": 0.0}


def _critic_inputs(ln) -> list[tuple[int, torch.Tensor]]:
    seen: list[tuple[int, torch.Tensor]] = []
    ln.rule.critic.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0], args[1].detach().clone())))
    return seen


def test_critic_t_samples_trains_on_fresh_draws():
    ln = _ac_learner(critic_t_samples=3, critic_steps=2, critic_norm="layer")
    seen = _critic_inputs(ln)
    stats = ln.update(fake_batch(), REWARDS)
    # the advantages value the actor's 8 interpolants; each critic step sees 8 × 3 rows
    assert [n for n, _ in seen] == [8, 24, 24]
    value_t, train_t = seen[0][1], seen[1][1].reshape(8, 3)
    assert torch.equal(train_t[:, 0], value_t)  # the actor's draw first, then two fresh ones
    assert len(torch.unique(train_t)) == 24
    for k in ("explained_variance", *(f"explained_variance_t{i}" for i in range(4))):
        assert math.isfinite(stats[k]), k
    # one draw per sample is the behaviour before the option: no extra draws from the generator
    one, same = _ac_learner(), _ac_learner(critic_t_samples=1)
    one.update(fake_batch(), REWARDS)
    same.update(fake_batch(), REWARDS)
    assert torch.equal(one.generator.get_state(), same.generator.get_state())


def test_critic_on_recorded_states():
    ln = _ac_learner(critic_states="rollout", critic_t_samples=2)
    seen = _critic_inputs(ln)
    ln.update(fake_batch(), REWARDS)  # recorded states at t = 1 (noise) and t = 0 (the sample)
    assert [n for n, _ in seen] == [8, 16]
    assert set(torch.cat([t for _, t in seen]).tolist()) <= {0.0, 1.0}
    batch = fake_batch()
    flat = dataclasses.replace(batch, states=batch.states[:, -1:])  # keep_states off: the sample only
    with pytest.raises(ValueError, match="keep_states"):
        _ac_learner(critic_states="rollout").update(flat, REWARDS)


def test_recorded_states_need_keep_states_at_config_time():
    with pytest.raises(ConfigError, match="keep_states") as exc:
        load_config(None, ["algorithm.ac_flow.critic_states=rollout", "rollout.keep_states=false"])
    assert "\n" not in str(exc.value)
    assert load_config(None, ["algorithm.ac_flow.critic_states=rollout"]).learner_settings().ac_flow.critic_states \
        == "rollout"


@pytest.mark.parametrize("actor", ["frozen", "orw"])
def test_warmup_actor_frozen_or_orw(actor):
    ln = _ac_learner(warmup_steps=5, warmup_actor=actor)
    before = {k: v.clone() for k, v in ln.policy.state_dict().items()}
    stats = ln.update(fake_batch(), REWARDS)
    moved = any(not torch.equal(v, before[k]) for k, v in ln.policy.state_dict().items())
    assert stats["warmup"] == 1.0 and moved == (actor == "orw")


def test_centred_weights_are_the_critic_weights_minus_their_mean_and_need_alpha_one():
    from learner.rules import Batch

    def weights(centre: bool) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        ln = _ac_learner(alpha=1.0, tau=2.0, centre_weights=centre)
        traj = fake_batch()
        b = Batch(traj.states[:, -1], ln.encode(list(traj.prompts)).index(traj.prompt_ids), REWARDS,
                  traj.prompt_list(), traj.prompt_ids, traj.states, traj.times)
        prep, stats, _ = ln.rule.prepare(ln, b)
        return prep["weights"], stats

    plain, s_plain = weights(False)
    centred, s_centred = weights(True)
    assert plain.mean().item() == pytest.approx(1.0, abs=1e-6) and plain.std() > 0.1
    torch.testing.assert_close(centred, plain - plain.mean(), rtol=0, atol=1e-7)
    assert abs(centred.sum().item()) < 1e-5 and s_centred["ess"] == s_plain["ess"]  # ESS of the uncentred weights
    with pytest.raises(ConfigError, match="centre_weights needs alpha >= 1"):
        load_config(None, ["algorithm.ac_flow.centre_weights=true", "algorithm.ac_flow.alpha=0.5"])


def test_the_w2_anchor_is_the_reference_or_the_rollout_policy():
    """anchor: reference holds the actor to π_ref; anchor: rollout to π_old. The losses' ``w2``
    is the mean square of v_θ − v_anchor, the networks' own: with π_old = π_θ (a fresh
    learner's copy) and a moved π_ref, it is that distance for the reference anchor and zero
    for the rollout anchor."""
    from learner.rules import Batch, cond_of

    def w2(anchor: str) -> tuple[float, float, float]:
        torch.manual_seed(0)
        ln = _ac_learner(alpha=1.0, anchor=anchor)
        with torch.no_grad():  # move the reference away from π_θ = π_old
            for p in ln.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        traj = fake_batch()
        b = Batch(traj.states[:, -1], ln.encode(list(traj.prompts)).index(traj.prompt_ids), REWARDS,
                  traj.prompt_list(), traj.prompt_ids, traj.states, traj.times)
        prep, _, _ = ln.rule.prepare(ln, b)
        _, stats = ln.rule.losses(ln, prep)
        with torch.no_grad():
            c = cond_of(prep)
            v = ln.actor(prep["x_t"], prep["t"], c)
            to_ref = (v - ln.reference(prep["x_t"], prep["t"], c)).pow(2).flatten(1).mean(1).mean()
            to_old = (v - ln.rollout(prep["x_t"], prep["t"], c)).pow(2).flatten(1).mean(1).mean()
        return float(stats["w2"]), float(to_ref), float(to_old)

    w2_ref, to_ref, to_old = w2("reference")
    assert to_old == 0.0 and to_ref > 1e-3
    assert w2_ref == pytest.approx(to_ref, rel=1e-5)
    w2_old, to_ref2, _ = w2("rollout")
    assert w2_old == 0.0 and to_ref2 == pytest.approx(to_ref, rel=1e-6)
    with pytest.raises(ConfigError, match="anchor"):
        load_config(None, ["algorithm.ac_flow.anchor=previous"])


@pytest.mark.parametrize("w", [0.5, -0.5])
def test_the_implicit_step_moves_the_optimum_one_over_beta_as_far_in_the_same_direction(w):
    """One sample, one pixel: w·(v⁺ − u)² + α·(v⁺ − a)² with v⁺ = a + β(v_θ − a). The paper's optimum
    (β = 1) is v* = (w·u + α·a)/(w + α); with β the loss is stationary at v_θ = a + (v* − a)/β."""
    u, a, alpha, beta = 3.0, 1.0, 1.0, 0.25
    assert implicit_velocity(torch.tensor(2.0), torch.tensor(1.0), 0.1).item() == pytest.approx(1.1)
    v_star = (w * u + alpha * a) / (w + alpha)            # 5/3 for w = 0.5, −1 for w = −0.5 (a centred weight)
    v_theta_star = a + (v_star - a) / beta               # 11/3 and −7

    def grad_at(v: float, b: float) -> float:
        v_t = torch.tensor([[[[v]]]], dtype=torch.float64, requires_grad=True)
        anchor = torch.tensor([[[[a]]]], dtype=torch.float64)
        loss, _ = ac_flow_actor_loss(implicit_velocity(v_t, anchor, b), torch.full_like(anchor, u), anchor,
                                     torch.tensor([w], dtype=torch.float64), alpha=alpha)
        loss.sum().backward()
        return float(v_t.grad)

    assert grad_at(v_star, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert grad_at(v_theta_star, beta) == pytest.approx(0.0, abs=1e-12)
    assert abs(grad_at(v_star, beta)) > 0.1  # the paper's optimum is not the implicit one's
    with pytest.raises(ValueError, match="implicit_step"):
        implicit_velocity(torch.tensor(1.0), torch.tensor(1.0), 0.0)


def test_the_implicit_step_scales_a_fresh_learners_actor_gradient_by_beta():
    """A fresh learner's π_old is π_θ, so v⁺ = v_θ in value: the loss is the paper's, and its gradient
    through v⁺ = π_old + β(v_θ − π_old) is β times the paper's, parameter by parameter."""
    from learner.rules import Batch

    def grads(beta: float) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        ln = _ac_learner(alpha=1.0, tau=2.0, centre_weights=True, anchor="rollout", implicit_step=beta)
        traj = fake_batch()
        b = Batch(traj.states[:, -1], ln.encode(list(traj.prompts)).index(traj.prompt_ids), REWARDS,
                  traj.prompt_list(), traj.prompt_ids, traj.states, traj.times)
        prep, _, _ = ln.rule.prepare(ln, b)
        losses, _ = ln.rule.losses(ln, prep)
        losses.mean().backward()
        return float(losses.mean().detach()), [p.grad.clone() for p in ln.actor.parameters() if p.grad is not None]

    loss_1, g_1 = grads(1.0)
    loss_b, g_b = grads(0.3)
    assert loss_b == pytest.approx(loss_1, rel=1e-6) and len(g_1) == len(g_b) > 0
    for x, y in zip(g_1, g_b, strict=True):
        torch.testing.assert_close(y, 0.3 * x, rtol=1e-5, atol=1e-8)
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="implicit_step"):
            load_config(None, [f"algorithm.ac_flow.implicit_step={bad}"])


def _grid_batch(ln: Learner, grid: torch.Tensor):
    """fake_batch's 8 rollouts with recorded states on ``grid`` (straight paths noise → sample)."""
    from learner.rules import Batch

    traj = fake_batch()
    x0, noise = traj.states[:, -1], traj.states[:, 0]
    states = torch.stack([(1 - t) * x0 + t * noise for t in grid], 1)
    return Batch(x0, ln.encode(list(traj.prompts)).index(traj.prompt_ids), REWARDS, traj.prompt_list(),
                 traj.prompt_ids, states, grid)


def test_grid_times_train_each_sample_at_distinct_grid_times_each_row_its_own_weight():
    """times: grid: M = int(K·0.99) = 3 distinct non-terminal grid times per sample (K = 4), a row
    each with fresh noise; a row's weight is exp(τ·clip(r̃ − V(x_t, t))) of its own state, normalised
    over all 24 rows; the critic trains on the same 24 states."""
    torch.manual_seed(0)
    ln = _ac_learner(times="grid", tau=2.0)
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    b = _grid_batch(ln, grid)
    prep, _, train = ln.rule.prepare(ln, b)
    m = 3
    assert train and {k: tuple(v.shape[:1]) for k, v in prep.items()} == dict.fromkeys(prep, (8 * m,))
    for row in prep["t"].reshape(8, m).tolist():
        assert len(set(row)) == m and set(row) <= {1.0, 0.75, 0.5, 0.25}
    x0 = b.x0.repeat_interleave(m, 0)
    tb = prep["t"][:, None, None, None]
    eps = (prep["x_t"] - (1 - tb) * x0) / tb  # every grid time here is > 0
    torch.testing.assert_close(prep["u"], eps - x0)
    assert len(torch.unique(eps.flatten(1), dim=0)) == 8 * m  # fresh noise per row
    target = prep["target"].reshape(8, m)
    assert torch.equal(target, target[:, :1].expand(8, m))  # a row's target: its sample's r̃
    with torch.no_grad():
        value = ln.rule.critic(prep["x_t"], prep["t"], prep["pooled"])
    w = torch.exp(2.0 * (prep["target"] - value).clamp(-1.0, 1.0))
    torch.testing.assert_close(prep["weights"], w / w.mean())
    seen = _critic_inputs(ln)
    stats = ln.update(dataclasses.replace(fake_batch(), states=b.states, times=grid), REWARDS)
    assert [n for n, _ in seen] == [8 * m, 8 * m]  # the values, then the critic's step on the same rows
    assert math.isfinite(stats["explained_variance"]) and math.isfinite(stats["loss"])


def test_grid_times_with_the_critics_own_draws():
    """times: grid with critic_t_samples 2: the critic trains on a sample's 3 grid states and its one
    fresh draw; with critic_states: rollout each row is valued at the recorded state nearest its own
    time, and the critic trains on a sample's 2 recorded states."""
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    ln = _ac_learner(times="grid", critic_t_samples=2)
    seen = _critic_inputs(ln)
    b = _grid_batch(ln, grid)
    ln.update(dataclasses.replace(fake_batch(), states=b.states, times=grid), REWARDS)
    assert [n for n, _ in seen] == [24, 8 * 4]
    trained = seen[1][1].reshape(8, 4)
    assert torch.equal(trained[:, :3], seen[0][1].reshape(8, 3))  # the actor's grid times first
    assert not set(trained[:, 3].tolist()) & {1.0, 0.75, 0.5, 0.25}  # then a fresh t ~ U(0, 1)
    ln = _ac_learner(times="grid", critic_states="rollout", critic_t_samples=2)
    seen = _critic_inputs(ln)
    prep, _, _ = ln.rule.prepare(ln, b)
    assert torch.equal(seen[0][1], prep["t"])  # each row valued at its own grid time's recorded state
    rows = torch.arange(24)
    k = (grid[None, :] - prep["t"][:, None]).abs().argmin(1)
    with torch.no_grad():
        value = ln.rule.critic(b.states[rows // 3, k], grid[k], prep["pooled"])
    w = torch.exp((prep["target"] - value).clamp(-1.0, 1.0))
    torch.testing.assert_close(prep["weights"], w / w.mean())
    assert torch.equal(prep["critic_t"].reshape(8, 3, 2), prep["critic_t"][::3][:, None].expand(8, 3, 2))
    seen.clear()
    ln.rule.after_step(ln, prep)
    assert [n for n, _ in seen] == [16]  # 8 samples × their 2 recorded states, once each
    assert load_config(None, ["algorithm.ac_flow.times=grid"]).learner_settings().ac_flow.times == "grid"

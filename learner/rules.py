"""Update rules: how the learner feeds each objective.

An objective (``learner/objectives``) is a pure function of tensors. A rule is the glue
that turns a scored batch into that function's inputs: it draws interpolants, runs the
frozen reference / rollout policy / critic without gradients, turns rewards into
advantages, and owns the state that comes with the method (a reward tracker, a critic).
``prepare`` works on the whole batch so that every batch-level quantity (weight
normalisation, advantages) is the same however the learner cuts it into micro-batches;
``losses`` is called per micro-batch with gradients on the policy.

The table ``RULES`` maps the config's objective name to its rule.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from learner.advantages import RewardTracker, clip_advantages, make_tracker, shape_rewards
from learner.coupling import couple
from learner.critic import ValueCritic
from learner.group import Rows
from learner.objectives import orw_cfm_w2_loss
from learner.objectives.ac_flow import (
    ac_flow_actor_loss,
    critic_regression_loss,
    critic_weights,
    explained_variance,
    explained_variance_by_t,
    implicit_velocity,
)
from learner.objectives.advantage_flow import advantage_flow_loss, check_convexity
from learner.objectives.awm import awm_log_prob, awm_loss
from learner.objectives.diffusion_nft import (
    diffusion_nft_loss,
    diffusion_nft_released_loss,
    grid_times_per_sample,
    nft_optimality,
    nft_training_times,
)
from learner.objectives.flow_grpo import flow_grpo_loss, nonzero_advantage_mask, num_train_timesteps
from learner.objectives.weighted import effective_sample_size
from learner.settings import LearnerSettings, TrackerParams
from samplers.flow import data_prediction, interpolate, sample_training_times, velocity_target
from samplers.rollout import guided_velocity
from samplers.sde import grid_t_max, noise_level, step_log_prob, step_mean_std
from samplers.text import PromptEmbeddings

if TYPE_CHECKING:
    from learner.learner import Learner

Prepared = dict[str, torch.Tensor]
"""Full-batch tensors, each (N, ...) and sliced along dim 0 into micro-batches."""


@dataclass(frozen=True)
class Batch:
    """A scored batch, or a learner rank's rows of one (learner/group.py).

    Whole batch (B rollouts): rewards (B,) and prompts B strings, from which every whole-batch
    quantity is computed. This learner's rows ``rows`` = [lo, hi) of it, n = hi − lo: x0 (n, C, H, W);
    cond n rows; prompt_ids (n,) int64 (equal ids = same prompt); for SDE rollouts also the
    recorded states (n, K + 1, C, H, W), times (K + 1,) and per-step log_probs (n, K). A single
    learner holds every row (``rows`` None means [0, B))."""

    x0: torch.Tensor
    cond: PromptEmbeddings
    rewards: torch.Tensor
    prompts: list[str]
    prompt_ids: torch.Tensor
    states: torch.Tensor | None = None
    times: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    rows: Rows | None = None

    @property
    def total(self) -> int:
        """Rollouts in the whole batch."""
        return int(self.rewards.shape[0])

    @property
    def mine(self) -> slice:
        """This learner's rows of the whole batch."""
        return self.rows.slice if self.rows is not None else slice(0, self.total)


def cond_of(p: Prepared) -> PromptEmbeddings:
    return PromptEmbeddings(p["tokens"], p["pooled"])


def draw_interpolants(ln: Learner, b: Batch, coupling: str = "independent") -> Prepared:
    """t ~ U(0, 1), ε ~ N(0, I) (coupled to x0 if asked), x_t and u for this learner's rows.

    Every rank draws the whole batch's t and ε from the (identically seeded) generator and keeps
    its rows, so each row gets the same draw however many learners share the batch, and the
    generators stay in step. Drawn on the CPU (the generator's device), then moved to x0's."""
    t = sample_training_times(b.total, ln.generator)[b.mine].to(b.x0.device)
    eps = torch.randn((b.total, *b.x0.shape[1:]), generator=ln.generator)[b.mine].to(b.x0.device)
    noise = couple(b.x0, eps, b.prompt_ids, coupling)  # type: ignore[arg-type]
    return {"x0": b.x0, "t": t, "x_t": interpolate(b.x0, noise, t), "u": velocity_target(b.x0, noise),
            "tokens": b.cond.tokens, "pooled": b.cond.pooled}


def draw_grid_interpolants(ln: Learner, b: Batch, fraction: float, method: str) -> Prepared:
    """DiffusionNFT's training times [code]: rows (sample i, its j-th time) sample-major, each
    sample int(K·fraction) distinct times of the rollout grid (``nft_training_times``) with fresh
    noise each. Like draw_interpolants, the whole batch's times and noise are drawn on every rank
    and each keeps its own samples' rows. ``method`` names the objective in the error."""
    if b.times is None:
        raise ValueError(f"{method} times: grid needs the rollouts' time grid (Trajectory.times)")
    t = nft_training_times(b.times, b.total, fraction, ln.generator)  # (B, M)
    m = t.shape[1]
    eps = torch.randn((b.total, m, *b.x0.shape[1:]), generator=ln.generator)
    dev = b.x0.device
    t, eps = t[b.mine].reshape(-1).to(dev), eps[b.mine].flatten(0, 1).to(dev)
    x0 = b.x0.repeat_interleave(m, 0)
    return {"x0": x0, "t": t, "x_t": interpolate(x0, eps, t), "u": velocity_target(x0, eps),
            "tokens": b.cond.tokens.repeat_interleave(m, 0), "pooled": b.cond.pooled.repeat_interleave(m, 0)}


def _recorded(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's recorded states (n, K + 1, C, H, W) and times (K + 1,), or a clear error."""
    if b.states is None or b.times is None or b.states.shape[1] < 2 or b.states.shape[1] != b.times.shape[0]:
        raise ValueError("ac_flow critic_states: rollout trains the critic on recorded states; "
                         "set rollout.keep_states: true (or critic_states: interpolant)")
    return b.states, b.times


def _tracker(p: TrackerParams) -> RewardTracker:
    return make_tracker(p.mode, buffer_size=p.buffer_size, min_count=p.min_count, global_std=p.global_std)


class Rule(Protocol):
    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        """Whole-batch inputs, statistics, and whether the actor trains this step."""
        ...

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def after_step(self, ln: Learner, p: Prepared) -> dict[str, float]: ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def to(self, device: torch.device) -> None:
        """Move the rule's own modules (AC-Flow's critic) to the learner's device."""
        ...


class _Stateless:
    def to(self, device: torch.device) -> None:
        return None

    def after_step(self, ln: Learner, p: Prepared) -> dict[str, float]:
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        return None


class ORWRule(_Stateless):
    """ORW-CFM-W2 on the rewards themselves (no baseline, no tracker)."""

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.orw

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        prep = draw_interpolants(ln, b, self.p.coupling)
        prep["rewards"] = b.rewards[b.mine]
        w = torch.exp(self.p.tau * b.rewards)
        # the batch-normalised option divides by the whole batch's mean weight
        norm = w.mean() if self.p.normalize_weights else torch.tensor(1.0, device=w.device)
        prep["normalizer"] = norm.expand(b.x0.shape[0])
        return prep, {"ess": float(effective_sample_size(w))}, True

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = cond_of(mb)
        v = ln.actor(mb["x_t"], mb["t"], c)
        with torch.no_grad():
            v_ref = ln.reference(mb["x_t"], mb["t"], c) if self.p.alpha > 0 else v.detach()
        return orw_cfm_w2_loss(v, mb["u"], v_ref, mb["rewards"], tau=self.p.tau, alpha=self.p.alpha,
                               weight_normalizer=mb["normalizer"][0] if self.p.normalize_weights else None)


class ACFlowRule:
    """AC-Flow [reconstructed]: shaped rewards, a critic at intermediate states, clipped
    advantages, a critic warm-up, generalised critic weighting and the W2 term.

    The critic trains on ``critic_t_samples`` states per sample and step: interpolants (the
    actor's draw first, then fresh t and ε per extra draw) or the rollout's recorded states at
    grid indices drawn uniformly (``critic_states: rollout``; the actor's baseline is then the
    value of the recorded state nearest the interpolant's t). Every draw is the whole batch's,
    sliced to this learner's rows, so a learner group matches one learner.

    ``times: grid`` [ours, DiffusionNFT's training times]: the actor trains on M = int(K·fraction)
    distinct times of each rollout's grid, a row per (sample, time) as DiffusionNFT's rule; each
    row has its own critic value, advantage and weight (normalised over all the batch's rows); the
    critic trains on those M states per sample (and its extra draws, once per sample)."""

    def __init__(self, s: LearnerSettings, in_channels: int, cond_dim: int) -> None:
        self.p = s.ac_flow
        if self.p.critic_t_samples < 1:
            raise ValueError(f"critic_t_samples must be at least 1, got {self.p.critic_t_samples}")
        self._m = 1  # the actor's rows per sample (times: grid, M)
        self.tracker = _tracker(self.p.tracker)
        torch.manual_seed(s.seed)
        self.critic = ValueCritic(in_channels, cond_dim, width=self.p.critic_width, norm=self.p.critic_norm)
        self.optimizer = torch.optim.AdamW(self.critic.parameters(), lr=self.p.critic_lr)
        self._trained: torch.nn.Module | None = None  # the critic as trained (DDP-wrapped in a group)

    def to(self, device: torch.device) -> None:
        self.critic.to(device)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        norm, tstats = self.tracker.normalize(b.prompts, b.rewards)
        shaped = shape_rewards(norm, self.p.shaping, self.p.shaping_limit)
        if self.p.times == "grid":
            prep = draw_grid_interpolants(ln, b, self.p.timestep_fraction, "ac_flow")
            self._m = grid_times_per_sample(b.times.numel() - 1, self.p.timestep_fraction)  # type: ignore[union-attr]
        else:
            prep = draw_interpolants(ln, b)
        m = self._m
        prep["target"] = shaped[b.mine].repeat_interleave(m)
        # the critic's own draws are a sample's: repeated on its M rows, so every key is row-shaped
        prep.update({k: v.repeat_interleave(m, 0) for k, v in self._critic_draws(ln, b).items()})
        x_v, t_v = prep["x_t"], prep["t"]
        if self.p.critic_states == "rollout":  # the recorded state nearest each interpolant's t
            states, times = _recorded(b)
            near = (times[None, :] - t_v[:, None]).abs().argmin(1)
            sample = torch.arange(x_v.shape[0], device=states.device) // m
            x_v, t_v = states[sample, near], times[near]
        with torch.no_grad():  # each rank values its rows; the advantages are the whole batch's (per sample, M each)
            value = ln.group.gather(self.critic(x_v, t_v, prep["pooled"]).reshape(-1, m), b.total).reshape(-1)
        shaped = shaped.repeat_interleave(m)  # a row's target: its sample's shaped reward
        adv = shaped - value
        clip_frac = 0.0
        if self.p.advantage_clip is not None:
            adv, clip_frac = clip_advantages(adv, self.p.advantage_clip)
        warming = ln.step < self.p.warmup_steps
        if warming and self.p.warmup_actor == "orw":
            w = critic_weights(shaped, family="exp", tau=self.p.tau)  # ORW weights on r̃
        else:
            w = critic_weights(adv, family=self.p.weighting, tau=self.p.tau)
        ess = float(effective_sample_size(w))
        if self.p.centre_weights:  # mean 1 (0 when every linear weight clipped): flat weights give no gradient
            w = w - w.mean()
        prep["weights"] = w.reshape(b.total, m)[b.mine].reshape(-1)
        stats = {"adv_std": float(adv.std()), "adv_clip_fraction": clip_frac, "warmup": float(warming),
                 "ess": ess,
                 "zero_spread_groups": tstats["zero_spread_groups"]}
        return prep, stats, not (warming and self.p.warmup_actor == "frozen")

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = cond_of(mb)
        v = ln.actor(mb["x_t"], mb["t"], c)
        anchor = ln.rollout if self.p.anchor == "rollout" else ln.reference
        beta = self.p.implicit_step
        with torch.no_grad():
            v_anchor = anchor(mb["x_t"], mb["t"], c) if self.p.alpha > 0 or beta != 1.0 else v.detach()
        if beta != 1.0:  # the implicit policy around the anchor; π_θ itself moves 1/β as far
            v = implicit_velocity(v, v_anchor, beta)
        return ac_flow_actor_loss(v, mb["u"], v_anchor, mb["weights"], alpha=self.p.alpha)

    def _critic_draws(self, ln: Learner, b: Batch) -> Prepared:
        """The critic's states beyond the actor's interpolant: ``critic_x`` (n, k', C, H, W) and
        ``critic_t`` (n, k'); none for one interpolant per sample (the behaviour before the option)."""
        k = self.p.critic_t_samples
        if self.p.critic_states == "rollout":
            states, times = _recorded(b)
            idx = torch.randint(times.shape[0], (b.total, k), generator=ln.generator)[b.mine].to(states.device)
            return {"critic_x": states[torch.arange(states.shape[0], device=states.device)[:, None], idx],
                    "critic_t": times[idx]}
        if k == 1:
            return {}
        extra = [draw_interpolants(ln, b) for _ in range(k - 1)]
        return {"critic_x": torch.stack([e["x_t"] for e in extra], 1), "critic_t": torch.stack([e["t"] for e in extra], 1)}

    def after_step(self, ln: Learner, p: Prepared) -> dict[str, float]:
        """Critic regression of r̃ on the batch's intermediate states (its own optimiser); in a
        learner group the critic trains data-parallel on every rank's rows (DDP averages its
        gradients), so its state stays the same on every rank. Statistics of the last critic
        step's predictions over all its rows: ``explained_variance`` and, per bucket of t,
        ``explained_variance_t0`` … ``t3`` (0.0 for a bucket with < 2 rows or equal targets)."""
        out: dict[str, float] = {}
        g = ln.group
        if self._trained is None:  # wrapped on first use: DDP's construction is a collective
            self._trained = g.wrap(self.critic)
        m = self._m  # the actor's rows per sample, sample-major; the critic's own draws repeat on them
        actor_x, actor_t = p["x_t"].reshape(-1, m, *p["x_t"].shape[1:]), p["t"].reshape(-1, m)
        if self.p.critic_states == "rollout":
            x, t = p["critic_x"][::m], p["critic_t"][::m]
        elif "critic_x" in p:
            x, t = torch.cat([actor_x, p["critic_x"][::m]], 1), torch.cat([actor_t, p["critic_t"][::m]], 1)
        else:
            x, t = actor_x, actor_t
        n, k = t.shape  # this learner's samples × the critic's states per sample
        target = p["target"][::m][:, None].expand(n, k)
        pooled = p["pooled"][::m].repeat_interleave(k, 0)
        flat_x, flat_t = x.reshape(n * k, *x.shape[2:]), t.reshape(n * k)
        for _ in range(self.p.critic_steps):
            pred = self._trained(flat_x, flat_t, pooled).reshape(n, k)
            losses, _ = critic_regression_loss(pred, target)
            self.optimizer.zero_grad(set_to_none=True)
            if g.distributed:  # Σ over the whole batch's rows / (B·k); DDP divides by the ranks
                total = int(g.sum([float(n)])[0])  # samples; rows are gathered per sample, (n, k)
                (losses.sum() * (g.world_size / (total * k))).backward()
                all_pred, all_target, all_t = (g.gather(v, total) for v in (pred.detach(), target.contiguous(), t))
                loss = g.sum([losses.detach().sum().item()])[0] / (total * k)
            else:
                losses.mean().backward()
                loss = losses.mean().item()
                all_pred, all_target, all_t = pred.detach(), target, t
            self.optimizer.step()
            out = {"critic_loss": loss, "explained_variance": explained_variance(all_pred, all_target),
                   **explained_variance_by_t(all_pred, all_target, all_t)}
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"critic.{k}": v.detach().contiguous() for k, v in self.critic.state_dict().items()}
        for pid, st in self.optimizer.state_dict()["state"].items():
            for name, val in st.items():
                tensors[f"critic_opt.{pid}.{name}"] = torch.as_tensor(val).contiguous()
        return tensors, {"tracker": self.tracker.state_dict(),
                         "critic_opt_groups": self.optimizer.state_dict()["param_groups"]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.critic.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})
        opt: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("critic_opt."):
                _, pid, name = k.split(".", 2)
                opt.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict({"state": opt, "param_groups": meta["critic_opt_groups"]})
        self.tracker.load_state_dict(meta["tracker"])


class _TrackedRule:
    """Shared by the advantage-based rules: a per-prompt tracker whose state is saved."""

    tracker: RewardTracker

    def to(self, device: torch.device) -> None:
        return None

    def after_step(self, ln: Learner, p: Prepared) -> dict[str, float]:
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"tracker": self.tracker.state_dict()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tracker.load_state_dict(meta["tracker"])

    def advantages(self, b: Batch, a_max: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The advantages of this learner's rows, and statistics, from the whole batch's rewards."""
        adv, tstats = self.tracker.normalize(b.prompts, b.rewards)
        adv, frac = clip_advantages(adv, a_max)
        return adv[b.mine], {"adv_std": float(adv.std()), "adv_clip_fraction": frac,
                             "zero_spread_groups": tstats["zero_spread_groups"]}


class AdvantageFlowRule(_TrackedRule):
    """AdvantageFlow [restated]: A·‖f_θ − x0‖² + γ‖f_θ − f_old‖² + λ‖f_θ − f_ref‖²."""

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.advantage_flow
        check_convexity(self.p.gamma, self.p.lam, self.p.advantage_clip)
        self.tracker = _tracker(self.p.tracker)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        prep = draw_interpolants(ln, b)
        prep["advantages"], stats = self.advantages(b, self.p.advantage_clip)
        c = b.cond
        with torch.no_grad():
            prep["f_old"] = data_prediction(prep["x_t"], prep["t"], ln.rollout(prep["x_t"], prep["t"], c))
            prep["f_ref"] = (data_prediction(prep["x_t"], prep["t"], ln.reference(prep["x_t"], prep["t"], c))
                             if self.p.lam > 0 else prep["f_old"])
        return prep, stats, True

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = data_prediction(mb["x_t"], mb["t"], ln.actor(mb["x_t"], mb["t"], cond_of(mb)))
        return advantage_flow_loss(f, mb["x0"], mb["f_old"], mb["f_ref"], mb["advantages"], gamma=self.p.gamma,
                                   lam=self.p.lam, adaptive_norm=self.p.adaptive_norm)


class AWMRule(_TrackedRule):
    """AWM [code]: a PPO ratio on the flow-matching log-likelihood, weighted by the advantage,
    at ``t_samples`` times per sample (fresh t and ε each; rows draw-major, as the release
    concatenates its time draws), plus KLs to the reference and to π_old.

    The released code's second KL is to an EMA adapter of the learner; here it is to π_old,
    the learner's one lagged copy (an EMA with ``learner.rollout_update: ema``)."""

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.awm
        if self.p.t_samples < 1:
            raise ValueError(f"awm t_samples must be at least 1, got {self.p.t_samples}")
        self.tracker = _tracker(self.p.tracker)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        adv, stats = self.advantages(b, self.p.advantage_clip)
        draws = [draw_interpolants(ln, b) for _ in range(self.p.t_samples)]
        prep = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
        # released: clamp(A, ±adv_clip_max) / adv_clip_max · advantage_max
        prep["advantages"] = (adv * (self.p.advantage_max / self.p.advantage_clip)).repeat(self.p.t_samples)
        with torch.no_grad():
            c = cond_of(prep)
            prep["v_old"] = ln.rollout(prep["x_t"], prep["t"], c)
            prep["old_log_prob"] = awm_log_prob(prep["v_old"], prep["u"], prep["t"], weighting=self.p.weighting,
                                                power=self.p.ghuber_power)  # float64, as released
            prep["v_ref"] = ln.reference(prep["x_t"], prep["t"], c) if self.p.beta > 0 else prep["v_old"]
        return prep, stats, True

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v = ln.actor(mb["x_t"], mb["t"], cond_of(mb))
        return awm_loss(v, mb["u"], mb["t"], mb["advantages"], mb["old_log_prob"], weighting=self.p.weighting,
                        power=self.p.ghuber_power, clip_range=self.p.clip_range, v_ref=mb["v_ref"],
                        beta=self.p.beta, v_old=mb["v_old"], old_beta=self.p.ema_beta)


class DiffusionNFTRule(_TrackedRule):
    """DiffusionNFT [code]: implicit positive/negative policies around the old policy, in x0
    space with adaptive weights (``loss: released``) or in velocity space (``velocity``).

    ``times: grid`` (the release): every sample is trained at int(K·timestep_fraction) distinct
    times of its rollout grid, each with fresh noise; each (sample, time) pair is one row of the
    loss, so the learner's mean over rows is the release's mean over samples and times.
    ``uniform``: one t ~ U(0, 1) per sample. The old policy's and the reference's velocities are
    computed per micro-batch, without gradient."""

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.diffusion_nft
        self.tracker = _tracker(self.p.tracker)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        prep = (draw_grid_interpolants(ln, b, self.p.timestep_fraction, "diffusion_nft") if self.p.times == "grid"
                else draw_interpolants(ln, b))
        adv, stats = self.advantages(b, self.p.advantage_clip)
        m = prep["x0"].shape[0] // adv.shape[0]  # rows per sample
        prep["r"] = nft_optimality(adv, self.p.advantage_clip).repeat_interleave(m)
        return prep, stats, True

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = cond_of(mb)
        with torch.no_grad():
            v_old = ln.rollout(mb["x_t"], mb["t"], c)
            v_ref = ln.reference(mb["x_t"], mb["t"], c) if self.p.ref_weight > 0 else None
        v = ln.actor(mb["x_t"], mb["t"], c)
        if self.p.loss == "released":
            return diffusion_nft_released_loss(v, v_old, mb["x_t"], mb["t"], mb["x0"], mb["r"], beta=self.p.beta,
                                               a_max=self.p.advantage_clip, v_ref=v_ref, ref_weight=self.p.ref_weight)
        return diffusion_nft_loss(v, v_old, mb["u"], mb["r"], beta=self.p.beta, v_ref=v_ref,
                                  ref_weight=self.p.ref_weight)


class FlowGRPORule(_TrackedRule):
    """Flow-GRPO as released [code]: the clipped ratio of each trained SDE step, plus a KL to
    the reference.

    Every (sample, step) pair is one row, so micro-batches cut across steps freely. Trained
    rows: the recorded steps (a finite log-prob: Flow-GRPO-Fast records its window only) among
    the first int(K·timestep_fraction), of the samples whose advantage is not 0 (see
    ``learner.objectives.flow_grpo``). With CFG rollouts the learner recomputes the log-prob
    under the same guidance, the unconditional prompt from ``ln.encode([""])``.
    """

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.flow_grpo
        self.tracker = _tracker(self.p.tracker)
        self._uncond: PromptEmbeddings | None = None
        # the release cuts each pass over the batch into minibatches, one optimiser step each
        self.steps_per_batch = self.p.minibatches
        self._seen: weakref.ref[Batch] | None = None  # the batch the cache below belongs to
        self._cache: tuple[torch.Tensor, torch.Tensor, dict[str, float]] | None = None
        self._calls = 0
        self._order: torch.Tensor | None = None

    def _uncond_rows(self, ln: Learner, n: int) -> PromptEmbeddings | None:
        """The unconditional prompt's embeddings for n rows on the learner's device (encoded once)."""
        if self.p.cfg_scale == 1.0:
            return None
        if self._uncond is None:
            self._uncond = ln.encode([""]).to(ln.device)
        u = self._uncond
        return PromptEmbeddings(u.tokens.expand(n, *u.tokens.shape[1:]), u.pooled.expand(n, *u.pooled.shape[1:]))

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        if b.states is None or b.log_probs is None or b.times is None or b.states.shape[1] < 2:
            raise ValueError("flow_grpo needs SDE rollouts with recorded states and log-probs "
                             "(policy.sampler: sde or sde_cps, rollout.keep_states: true)")
        m = self.p.minibatches
        if self._cache is None or self._seen is None or self._seen() is not b:
            # a new batch: its advantages and kept samples, once, over the whole batch (the learner's
            # generator is in step on every rank, so every rank keeps the same samples)
            whole, tstats = self.tracker.normalize(b.prompts, b.rewards)
            whole, frac = clip_advantages(whole, self.p.advantage_clip)
            keep = (nonzero_advantage_mask(whole, m, ln.generator) if self.p.filter_zero_advantage
                    else torch.ones_like(whole, dtype=torch.bool))
            self._cache = (whole, keep, {"adv_std": float(whole.std()), "adv_clip_fraction": frac,
                                         "zero_spread_groups": tstats["zero_spread_groups"],
                                         "zero_advantage_fraction": float((whole == 0).float().mean())})
            self._seen, self._calls = weakref.ref(b), 0
        whole, keep, stats = self._cache[0], self._cache[1], dict(self._cache[2])
        if m > 1:  # each pass: the kept samples shuffled and cut into m equal parts [code]
            if self._calls % m == 0:
                kept = torch.nonzero(keep).flatten()
                self._order = kept[torch.randperm(kept.numel(), generator=ln.generator).to(kept.device)]
            assert self._order is not None
            part, n = self._calls % m, self._order.numel()
            keep = torch.zeros_like(keep)
            keep[self._order[n * part // m:n * (part + 1) // m]] = True
        self._calls += 1
        adv_all = whole[b.mine]
        k = b.log_probs.shape[1]
        dev = b.log_probs.device
        trained = torch.isfinite(b.log_probs)  # Fast: only the window's steps are recorded
        trained[:, num_train_timesteps(k, self.p.timestep_fraction):] = False
        trained &= keep[b.mine].to(dev)[:, None]
        sample, step = torch.nonzero(trained, as_tuple=True)
        weight = torch.ones(sample.shape[0], device=dev)
        g = ln.group
        if g.distributed and sample.numel() == 0:
            # a rank with no trained row still makes its forwards: one recorded step with weight 0
            sample, step = (i[:1] for i in torch.nonzero(torch.isfinite(b.log_probs), as_tuple=True))
            weight = torch.zeros(1, device=dev)
        if g.distributed:  # the learner divides by every rank's rows; the mean is over real ones
            rows_all, real_all = g.sum([float(weight.numel()), float(weight.sum())])
            weight = weight * (rows_all / max(real_all, 1.0))
        if sample.numel() == 0:
            raise ValueError(f"flow_grpo has no step to train in this batch: the recorded steps lie beyond the first "
                             f"int(K·timestep_fraction) = {num_train_timesteps(k, self.p.timestep_fraction)} of {k}")
        if self.p.step_kind == "cps" and self.p.kl_beta > 0 and bool((b.times[step + 1] == 0).any()):
            raise ValueError("flow_grpo's KL divides by the cps std s·sin(aπ/2), 0 on the step into t = 0: "
                             "train fewer steps (timestep_fraction < 1 or a window before the last step) or kl_beta 0")
        x_t, x_s = b.states[sample, step], b.states[sample, step + 1]
        prep = {
            "x_t": x_t, "x_s": x_s, "t": b.times[step], "s": b.times[step + 1],
            "old_log_prob": b.log_probs[sample, step], "advantages": adv_all[sample], "weight": weight,
            "tokens": b.cond.tokens[sample], "pooled": b.cond.pooled[sample],
            "t_max": torch.full((sample.shape[0],), grid_t_max(b.times), device=dev),
        }
        return prep, stats, True

    def _velocity(self, ln: Learner, model: torch.nn.Module, mb: Prepared) -> torch.Tensor:
        c = cond_of(mb)
        return guided_velocity(model, mb["x_t"], mb["t"], c, self._uncond_rows(ln, mb["x_t"].shape[0]),
                               self.p.cfg_scale, detach_uncond=self.p.detach_uncond)

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kind, a, t_max = self.p.step_kind, self.p.sde_a, float(mb["t_max"][0])
        mean, std = step_mean_std(kind, mb["x_t"], mb["t"], mb["s"], self._velocity(ln, ln.actor, mb), a, t_max=t_max)
        log_prob = step_log_prob(kind, mb["x_s"], mean, std)
        mean_ref, kl_std = None, None
        if self.p.kl_beta > 0:
            with torch.no_grad():
                mean_ref, _ = step_mean_std(kind, mb["x_t"], mb["t"], mb["s"], self._velocity(ln, ln.reference, mb),
                                            a, t_max=t_max)
            # the release divides by 2σ_t² (its std_dev_t); "step": by the step's variance
            kl_std = noise_level(mb["t"], mb["s"], a, kind, t_max=t_max) if self.p.kl_std == "noise_level" else std
        losses, stats = flow_grpo_loss(log_prob, mb["old_log_prob"], mb["advantages"], clip_eps=self.p.clip_eps,
                                       mean_theta=mean, mean_ref=mean_ref, std=kl_std, kl_beta=self.p.kl_beta)
        return losses * mb["weight"], stats


def build_rule(s: LearnerSettings, in_channels: int, cond_dim: int) -> Rule:
    """The rule for ``s.objective``; an unknown name lists the valid ones."""
    table = {
        "orw_cfm_w2": lambda: ORWRule(s),
        "ac_flow": lambda: ACFlowRule(s, in_channels, cond_dim),
        "advantage_flow": lambda: AdvantageFlowRule(s),
        "diffusion_nft": lambda: DiffusionNFTRule(s),
        "flow_grpo": lambda: FlowGRPORule(s),
        "awm": lambda: AWMRule(s),
    }
    if s.objective not in table:
        raise ValueError(f"unknown objective {s.objective!r}; valid: {', '.join(sorted(table))}")
    return table[s.objective]()


def settings_json(s: LearnerSettings) -> str:
    return json.dumps(asdict(s))

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
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from learner.advantages import PerPromptStatTracker, clip_advantages, shape_rewards
from learner.coupling import couple
from learner.critic import ValueCritic
from learner.group import Rows
from learner.objectives import orw_cfm_w2_loss
from learner.objectives.ac_flow import ac_flow_actor_loss, critic_regression_loss, critic_weights
from learner.objectives.advantage_flow import advantage_flow_loss, check_convexity
from learner.objectives.diffusion_nft import diffusion_nft_loss, nft_optimality
from learner.objectives.flow_grpo import flow_grpo_loss
from learner.objectives.weighted import effective_sample_size
from learner.settings import LearnerSettings, TrackerParams
from samplers.flow import data_prediction, interpolate, sample_training_times, velocity_target
from samplers.sde import gaussian_log_prob, grid_t_max, sde_step_mean_std
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


def _tracker(p: TrackerParams) -> PerPromptStatTracker:
    return PerPromptStatTracker(buffer_size=p.buffer_size, min_count=p.min_count, global_std=p.global_std)


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
    advantages, a critic warm-up, generalised critic weighting and the W2 term."""

    def __init__(self, s: LearnerSettings, in_channels: int, cond_dim: int) -> None:
        self.p = s.ac_flow
        self.tracker = _tracker(self.p.tracker)
        torch.manual_seed(s.seed)
        self.critic = ValueCritic(in_channels, cond_dim, width=self.p.critic_width)
        self.optimizer = torch.optim.AdamW(self.critic.parameters(), lr=self.p.critic_lr)
        self._trained: torch.nn.Module | None = None  # the critic as trained (DDP-wrapped in a group)

    def to(self, device: torch.device) -> None:
        self.critic.to(device)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        norm, tstats = self.tracker.normalize(b.prompts, b.rewards)
        shaped = shape_rewards(norm, self.p.shaping, self.p.shaping_limit)
        prep = draw_interpolants(ln, b)
        prep["target"] = shaped[b.mine]
        with torch.no_grad():  # each rank values its rows; the advantages are the whole batch's
            value = ln.group.gather(self.critic(prep["x_t"], prep["t"], b.cond.pooled), b.total)
        adv = shaped - value
        clip_frac = 0.0
        if self.p.advantage_clip is not None:
            adv, clip_frac = clip_advantages(adv, self.p.advantage_clip)
        warming = ln.step < self.p.warmup_steps
        if warming and self.p.warmup_actor == "orw":
            w = critic_weights(shaped, family="exp", tau=self.p.tau)  # ORW weights on r̃
        else:
            w = critic_weights(adv, family=self.p.weighting, tau=self.p.tau)
        prep["weights"] = w[b.mine]
        stats = {"adv_std": float(adv.std()), "adv_clip_fraction": clip_frac, "warmup": float(warming),
                 "ess": float(effective_sample_size(w)),
                 "zero_spread_groups": tstats["zero_spread_groups"]}
        return prep, stats, not (warming and self.p.warmup_actor == "frozen")

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = cond_of(mb)
        v = ln.actor(mb["x_t"], mb["t"], c)
        with torch.no_grad():
            v_ref = ln.reference(mb["x_t"], mb["t"], c) if self.p.alpha > 0 else v.detach()
        return ac_flow_actor_loss(v, mb["u"], v_ref, mb["weights"], alpha=self.p.alpha)

    def after_step(self, ln: Learner, p: Prepared) -> dict[str, float]:
        """Critic regression of r̃ on the batch's intermediate states (its own optimiser); in a
        learner group the critic trains data-parallel on every rank's rows (DDP averages its
        gradients), so its state stays the same on every rank."""
        out: dict[str, float] = {}
        g = ln.group
        if self._trained is None:  # wrapped on first use: DDP's construction is a collective
            self._trained = g.wrap(self.critic)
        for _ in range(self.p.critic_steps):
            pred = self._trained(p["x_t"], p["t"], p["pooled"])
            losses, st = critic_regression_loss(pred, p["target"])
            self.optimizer.zero_grad(set_to_none=True)
            if g.distributed:  # Σ over the whole batch's rows / B; DDP divides by the ranks
                total = int(g.sum([float(losses.shape[0])])[0])
                (losses.sum() * (g.world_size / total)).backward()
                _, st = critic_regression_loss(g.gather(pred.detach(), total), g.gather(p["target"], total))
                loss = g.sum([losses.detach().sum().item()])[0] / total
            else:
                losses.mean().backward()
                loss = losses.mean().item()
            self.optimizer.step()
            out = {"critic_loss": loss, "explained_variance": float(st["explained_variance"])}
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

    tracker: PerPromptStatTracker

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


class DiffusionNFTRule(_TrackedRule):
    """DiffusionNFT [code]: r·‖v⁺ − u‖² + (1 − r)·‖v⁻ − u‖² around the old policy."""

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.diffusion_nft
        self.tracker = _tracker(self.p.tracker)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        prep = draw_interpolants(ln, b)
        adv, stats = self.advantages(b, self.p.advantage_clip)
        prep["r"] = nft_optimality(adv, self.p.advantage_clip)
        with torch.no_grad():
            prep["v_old"] = ln.rollout(prep["x_t"], prep["t"], b.cond)
            prep["v_ref"] = ln.reference(prep["x_t"], prep["t"], b.cond) if self.p.ref_weight > 0 else prep["v_old"]
        return prep, stats, True

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v = ln.actor(mb["x_t"], mb["t"], cond_of(mb))
        return diffusion_nft_loss(v, mb["v_old"], mb["u"], mb["r"], beta=self.p.beta,
                                  v_ref=mb["v_ref"] if self.p.ref_weight > 0 else None, ref_weight=self.p.ref_weight)


class FlowGRPORule(_TrackedRule):
    """Flow-GRPO: the clipped ratio of each recorded SDE step, plus a KL to the reference.

    Every (sample, step) pair is one row, so micro-batches cut across steps freely.
    """

    def __init__(self, s: LearnerSettings) -> None:
        self.p = s.flow_grpo
        self.tracker = _tracker(self.p.tracker)

    def prepare(self, ln: Learner, b: Batch) -> tuple[Prepared, dict[str, float], bool]:
        if b.states is None or b.log_probs is None or b.times is None or b.states.shape[1] < 2:
            raise ValueError("flow_grpo needs SDE rollouts with recorded states and log-probs "
                             "(policy.sampler: sde, rollout.keep_states: true)")
        adv, stats = self.advantages(b, self.p.advantage_clip)
        bsz, k = b.log_probs.shape  # this learner's rollouts
        rows = bsz * k
        flat = lambda x: x.reshape(rows, *x.shape[2:])  # noqa: E731 - (B, K, ...) → (B·K, ...)
        prep = {
            "x_t": flat(b.states[:, :-1]), "x_s": flat(b.states[:, 1:]),
            "t": b.times[:-1].repeat(bsz), "s": b.times[1:].repeat(bsz),
            "old_log_prob": b.log_probs.reshape(rows), "advantages": adv.repeat_interleave(k),
            "tokens": b.cond.tokens.repeat_interleave(k, 0), "pooled": b.cond.pooled.repeat_interleave(k, 0),
            "t_max": torch.full((rows,), grid_t_max(b.times), device=b.log_probs.device),
        }
        return prep, stats, True

    def losses(self, ln: Learner, mb: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, t_max = cond_of(mb), float(mb["t_max"][0])
        mean, std = sde_step_mean_std(mb["x_t"], mb["t"], mb["s"], ln.actor(mb["x_t"], mb["t"], c),
                                      self.p.sde_a, t_max=t_max)
        log_prob = gaussian_log_prob(mb["x_s"], mean, std)
        mean_ref = None
        if self.p.kl_beta > 0:
            with torch.no_grad():
                mean_ref, _ = sde_step_mean_std(mb["x_t"], mb["t"], mb["s"], ln.reference(mb["x_t"], mb["t"], c),
                                                self.p.sde_a, t_max=t_max)
        return flow_grpo_loss(log_prob, mb["old_log_prob"], mb["advantages"], clip_eps=self.p.clip_eps,
                              mean_theta=mean, mean_ref=mean_ref, std=std if self.p.kl_beta > 0 else None,
                              kl_beta=self.p.kl_beta)


def build_rule(s: LearnerSettings, in_channels: int, cond_dim: int) -> Rule:
    """The rule for ``s.objective``; an unknown name lists the valid ones."""
    table = {
        "orw_cfm_w2": lambda: ORWRule(s),
        "ac_flow": lambda: ACFlowRule(s, in_channels, cond_dim),
        "advantage_flow": lambda: AdvantageFlowRule(s),
        "diffusion_nft": lambda: DiffusionNFTRule(s),
        "flow_grpo": lambda: FlowGRPORule(s),
    }
    if s.objective not in table:
        raise ValueError(f"unknown objective {s.objective!r}; valid: {', '.join(sorted(table))}")
    return table[s.objective]()


def settings_json(s: LearnerSettings) -> str:
    return json.dumps(asdict(s))

"""Learner settings: optimisation plus one parameter set per objective.

Plain frozen dataclasses (no pydantic here: the learner must not import the config
tree); services.config validates user input and maps it onto these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves under dotted keys ({"a": {"b": 1}} → {"a.b": 1}); an empty dict
    is a leaf. Shared by the learner's and the run's checks that a resume keeps its settings."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


EmaSchedule = Literal["constant", "nft_decay0", "nft_decay1", "nft_decay2"]
ObjectiveName = Literal["orw_cfm_w2", "ac_flow", "advantage_flow", "diffusion_nft", "flow_grpo", "awm"]


@dataclass(frozen=True)
class ORWParams:
    """ORW-CFM-W2; defaults are the released code's [code] (its 5,000-step lr warm-up is the
    learner's ``warmup_steps``, and its minibatch-OT coupling ``coupling``: the digits config
    keeps 10 steps and independent coupling [ours], docs/algorithms.md)."""

    tau: float = 0.5
    alpha: float = 1.0
    normalize_weights: bool = False
    coupling: Literal["independent", "minibatch_ot"] = "independent"


@dataclass(frozen=True)
class TrackerParams:
    """Per-prompt reward statistics (shared by the advantage-based objectives).

    mode ``buffer``: DDPO's running per-prompt buffers (buffer_size, min_count apply);
    ``batch``: the released Flow-GRPO/DiffusionNFT tracker, this batch only (learner/advantages.py)."""

    buffer_size: int = 32
    min_count: int = 16
    global_std: bool = False
    mode: Literal["buffer", "batch"] = "buffer"


@dataclass(frozen=True)
class ACFlowParams:
    """AC-Flow [reconstructed]: shaping, critic, clipping, warm-up, weighting, W2."""

    tau: float = 1.0
    alpha: float = 1.0
    weighting: Literal["exp", "linear", "softplus"] = "exp"
    shaping: Literal["none", "clip", "tanh"] = "tanh"
    shaping_limit: float = 1.0
    advantage_clip: float | None = 1.0
    warmup_steps: int = 20
    warmup_actor: Literal["frozen", "orw"] = "frozen"
    critic_lr: float = 1e-3
    critic_steps: int = 1
    critic_width: int = 32
    critic_norm: Literal["none", "layer"] = "none"
    critic_t_samples: int = 1
    critic_states: Literal["interpolant", "rollout"] = "interpolant"
    centre_weights: bool = False  # [ours] w − mean(w): no gradient from flat weights (needs α ≥ 1)
    anchor: Literal["reference", "rollout"] = "reference"  # the W2 term's other policy: π_ref or [ours] π_old
    implicit_step: float = 1.0  # [ours] the loss on v_anchor + β(v_θ − v_anchor): a 1/β step (DiffusionNFT's β)
    times: Literal["uniform", "grid"] = "uniform"  # the actor's t ~ U(0, 1), or [ours] DiffusionNFT's grid times
    timestep_fraction: float = 0.99  # grid: int(K·fraction) distinct grid times per sample
    tracker: TrackerParams = field(default_factory=TrackerParams)


@dataclass(frozen=True)
class AdvantageFlowParams:
    """AdvantageFlow [restated]: γ rollout term, λ reference term, EMA rollout policy.

    Sources (docs/algorithms.md): γ = 1.1 and λ = 1e-3 are MeanFlowAdvantage's values
    [restated by ALGORITHMS.md], not confirmed for AdvantageFlow; A_max = 1 [ours];
    adaptive_norm off [ours] although the restatement uses it."""

    gamma: float = 1.1
    lam: float = 1e-3
    advantage_clip: float = 1.0
    adaptive_norm: bool = False
    tracker: TrackerParams = field(default_factory=lambda: TrackerParams(global_std=True))


@dataclass(frozen=True)
class DiffusionNFTParams:
    """DiffusionNFT [code]: implicit positive/negative policies around the old policy."""

    beta: float = 1.0
    advantage_clip: float = 5.0
    ref_weight: float = 1e-4  # the release's config.train.beta, always on [code]
    loss: Literal["released", "velocity"] = "released"  # x0 space with adaptive weights [code], or velocity space
    times: Literal["grid", "uniform"] = "grid"  # training times from the rollout grid [code], or t ~ U(0, 1)
    timestep_fraction: float = 0.99  # grid: int(K·fraction) distinct grid times per sample [code]
    tracker: TrackerParams = field(default_factory=lambda: TrackerParams(global_std=True, mode="batch"))


@dataclass(frozen=True)
class FlowGRPOParams:
    """Flow-GRPO [paper][code]: clipped ratio per SDE step, KL to the reference."""

    sde_a: float = 0.7
    clip_eps: float = 1e-4
    kl_beta: float = 0.04
    advantage_clip: float = 5.0
    step_kind: Literal["sde", "cps"] = "sde"  # the sampler's step (policy.sampler sde / sde_cps)
    kl_std: Literal["noise_level", "step"] = "noise_level"  # KL divisor: 2σ_t² [code] or 2·(step std)²
    timestep_fraction: float = 0.99  # train the first int(K·fraction) recorded steps [code]
    filter_zero_advantage: bool = True  # drop samples whose advantage is exactly 0 [code]
    cfg_scale: float = 1.0  # the rollouts' guidance, recomputed by the learner
    detach_uncond: bool = True  # no gradient through CFG's unconditional branch [code]
    minibatches: int = 1  # optimiser steps per pass over a batch, each on 1/n of its samples [code]
    tracker: TrackerParams = field(default_factory=lambda: TrackerParams(global_std=True, mode="batch"))


@dataclass(frozen=True)
class AWMParams:
    """AWM [code]: advantage-weighted flow matching, KL to the reference and to π_old."""

    beta: float = 0.003
    ema_beta: float = 1.0
    weighting: Literal["uniform", "t", "t2", "huber", "ghuber"] = "ghuber"
    ghuber_power: float = 0.25
    clip_range: float = 1.0
    advantage_clip: float = 5.0
    advantage_max: float = 1.0
    t_samples: int = 6
    tracker: TrackerParams = field(default_factory=lambda: TrackerParams(global_std=True, mode="batch"))


@dataclass(frozen=True)
class LearnerSettings:
    """Optimisation settings and the chosen objective's parameters."""

    objective: ObjectiveName = "orw_cfm_w2"
    orw: ORWParams = field(default_factory=ORWParams)
    ac_flow: ACFlowParams = field(default_factory=ACFlowParams)
    advantage_flow: AdvantageFlowParams = field(default_factory=AdvantageFlowParams)
    diffusion_nft: DiffusionNFTParams = field(default_factory=DiffusionNFTParams)
    flow_grpo: FlowGRPOParams = field(default_factory=FlowGRPOParams)
    awm: AWMParams = field(default_factory=AWMParams)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 10
    micro_batch_size: int = 64
    updates_per_batch: int = 1
    rollout_update: Literal["copy", "ema"] = "copy"
    rollout_refresh_every: int = 1
    rollout_ema_decay: float = 0.9
    rollout_ema_schedule: EmaSchedule = "constant"
    rollout_ema_every: Literal["step", "refresh"] = "step"
    seed: int = 0

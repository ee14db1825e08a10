"""Learner settings: optimisation plus one parameter set per objective.

Plain frozen dataclasses (no pydantic here: the learner must not import the config
tree); services.config validates user input and maps it onto these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ObjectiveName = Literal["orw_cfm_w2", "ac_flow", "advantage_flow", "diffusion_nft", "flow_grpo"]


@dataclass(frozen=True)
class ORWParams:
    """ORW-CFM-W2; defaults are the released code's."""

    tau: float = 0.5
    alpha: float = 1.0
    normalize_weights: bool = False
    coupling: Literal["independent", "minibatch_ot"] = "independent"


@dataclass(frozen=True)
class TrackerParams:
    """Per-prompt reward statistics (shared by the advantage-based objectives)."""

    buffer_size: int = 32
    min_count: int = 16
    global_std: bool = False


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
    tracker: TrackerParams = field(default_factory=TrackerParams)


@dataclass(frozen=True)
class AdvantageFlowParams:
    """AdvantageFlow [restated]: γ rollout term, λ reference term, EMA rollout policy."""

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
    ref_weight: float = 0.0
    tracker: TrackerParams = field(default_factory=lambda: TrackerParams(global_std=True))


@dataclass(frozen=True)
class FlowGRPOParams:
    """Flow-GRPO [paper][code]: clipped ratio per SDE step, KL to the reference."""

    sde_a: float = 0.7
    clip_eps: float = 1e-4
    kl_beta: float = 0.04
    advantage_clip: float = 5.0
    tracker: TrackerParams = field(default_factory=lambda: TrackerParams(global_std=True))


@dataclass(frozen=True)
class LearnerSettings:
    """Optimisation settings and the chosen objective's parameters."""

    objective: ObjectiveName = "orw_cfm_w2"
    orw: ORWParams = field(default_factory=ORWParams)
    ac_flow: ACFlowParams = field(default_factory=ACFlowParams)
    advantage_flow: AdvantageFlowParams = field(default_factory=AdvantageFlowParams)
    diffusion_nft: DiffusionNFTParams = field(default_factory=DiffusionNFTParams)
    flow_grpo: FlowGRPOParams = field(default_factory=FlowGRPOParams)
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
    seed: int = 0

"""Objectives as pure functions of tensors and scalars.

Each returns per-sample losses (B,) and a dict of detached statistics; the learner
owns reduction and accumulation, and ``learner/rules.py`` maps the config's
``algorithm.name`` to the rule that feeds one of these. No Ray, Redis, diffusers or
config objects here.
"""

from learner.objectives.ac_flow import ac_flow_actor_loss, critic_regression_loss, critic_weights
from learner.objectives.advantage_flow import (
    advantage_flow_loss,
    advantage_flow_target,
    check_convexity,
)
from learner.objectives.awm import awm_log_prob, awm_loss
from learner.objectives.diffusion_nft import diffusion_nft_loss, nft_optimality
from learner.objectives.flow_grpo import flow_grpo_loss
from learner.objectives.orw import orw_cfm_w2_loss, orw_weights
from learner.objectives.weighted import weighted_cfm_w2_loss

__all__ = [
    "ac_flow_actor_loss", "advantage_flow_loss", "advantage_flow_target", "awm_log_prob", "awm_loss", "check_convexity",
    "critic_regression_loss", "critic_weights", "diffusion_nft_loss", "flow_grpo_loss", "nft_optimality",
    "orw_cfm_w2_loss", "orw_weights", "weighted_cfm_w2_loss",
]

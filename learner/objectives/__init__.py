"""Objectives as pure functions of tensors and scalars, looked up by name.

Each returns per-sample losses (B,) and a dict of detached statistics; the learner
owns reduction and accumulation. No Ray, Redis, diffusers or config objects here.
"""

from learner.objectives.orw import orw_cfm_w2_loss, orw_weights

__all__ = ["orw_cfm_w2_loss", "orw_weights"]

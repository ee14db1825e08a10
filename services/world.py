"""Builds the parts a config names: policy, sampler, learner (rewards: services/rewards.py).

The one place that knows which concrete classes a config value stands for, so the
actors and the driver stay generic.
"""

from __future__ import annotations

from pathlib import Path

from learner.learner import Learner
from samplers import digits
from samplers.policy import SD3Velocity, load_velocity
from samplers.sampler import Sampler
from samplers.text import PromptEncoder
from services.config import PolicyConfig, TrainConfig


def policy_checkpoint(cfg: PolicyConfig) -> Path:
    path = cfg.checkpoint or digits.POLICY_FILE
    if not Path(path).is_file():
        hint = " (make it with `fmrl pretrain-digits`)" if cfg.checkpoint is None else ""
        raise FileNotFoundError(f"policy checkpoint not found: {path}{hint}")
    return Path(path)


def load_policy(cfg: PolicyConfig) -> tuple[SD3Velocity, PromptEncoder]:
    """The velocity model and its frozen prompt encoder."""
    return load_velocity(policy_checkpoint(cfg)), PromptEncoder()


def build_sampler(cfg: TrainConfig) -> Sampler:
    velocity, encoder = load_policy(cfg.policy)
    return Sampler(
        velocity, encoder.encode, digits.to_uint8, digits.IMAGE_SHAPE,
        num_steps=cfg.policy.num_steps, shift=cfg.policy.shift, cfg_scale=cfg.policy.cfg_scale,
        keep_states=cfg.rollout.keep_states, kind=cfg.policy.sampler, sde_a=cfg.policy.sde_a,
    )


def build_learner(cfg: TrainConfig) -> Learner:
    velocity, encoder = load_policy(cfg.policy)
    return Learner(velocity, encoder.encode, cfg.learner_settings())

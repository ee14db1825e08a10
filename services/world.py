"""Builds the parts a config names: policy, sampler, learner (rewards: services/rewards.py).

The one place that knows which concrete classes a config value stands for, so the
actors and the driver stay generic. Two policy families share every other part: the
digits world (a small SD3 transformer in pixel space, MiniLM prompts) and Stable
Diffusion 3 pipelines (latents, the pipeline's own text encoders and VAE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learner.group import LearnerGroup
from learner.learner import Learner
from samplers import compose, digits
from samplers.policy import SD3Velocity, add_lora, load_velocity, read_tensors
from samplers.sampler import Sampler
from samplers.text import PromptEmbeddings, PromptEncoder
from services.config import PolicyConfig, TrainConfig

#: the pixel-space worlds: policy.kind → (its shipped policy file, the command that makes it)
PIXEL_WORLDS = {"digits": (digits.POLICY_FILE, "fmrl pretrain-digits"),
                "compose": (compose.POLICY_FILE, "fmrl pretrain-compose")}


def policy_checkpoint(cfg: PolicyConfig) -> Path:
    shipped, command = PIXEL_WORLDS[cfg.kind]
    path = cfg.checkpoint or shipped
    if not Path(path).is_file():
        hint = f" (make it with `{command}`)" if cfg.checkpoint is None else ""
        raise FileNotFoundError(f"policy checkpoint not found: {path}{hint}")
    return Path(path)


def check_policy_source(cfg: PolicyConfig) -> None:
    """Fail early, naming it, when the policy's weights cannot be there (or, for the digits
    policy, a few MB, when its file is damaged: its digest is verified here)."""
    if cfg.kind in PIXEL_WORLDS:
        read_tensors(policy_checkpoint(cfg))
    else:
        from samplers.sd3 import locate_sd3_pipeline

        locate_sd3_pipeline(str(cfg.pretrained))


def resolve_checkpoint(path: Path) -> Path:
    """A policy file, a checkpoint directory, or a run directory → the policy safetensors.
    Inside a directory, a link that leaves it is refused (a run writes no links)."""
    for cand in (path, path / "policy.safetensors", path / "checkpoint" / "policy.safetensors"):
        if cand.is_file():
            if cand != path and not cand.resolve().is_relative_to(path.resolve()):
                raise ValueError(f"{cand} is a link to {cand.resolve()}, outside {path}; refusing it")
            return cand
    raise FileNotFoundError(f"no policy checkpoint at {path} (looked for the file, "
                            "policy.safetensors and checkpoint/policy.safetensors)")


def pixel_shape(velocity: SD3Velocity) -> tuple[int, int, int]:
    """(C, H, W) of a pixel-space world's samples, as its checkpoint's transformer config says
    (the digits world's 1×8×8, the compose world's 1×16×16)."""
    c = velocity.transformer.config
    return (int(c.in_channels), int(c.sample_size), int(c.sample_size))


@dataclass
class PolicyParts:
    """What samplers and the learner need of a policy family."""

    velocity: SD3Velocity
    encode: Callable[[list[str]], PromptEmbeddings]
    decode: Callable[[torch.Tensor], np.ndarray]
    latent_shape: tuple[int, ...]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(cfg: PolicyConfig) -> PolicyParts:
    """The velocity model (with its LoRA adapter when configured), its frozen prompt encoder,
    its decoder to uint8 images and the shape of its samples."""
    if cfg.kind in PIXEL_WORLDS:
        encoder = PromptEncoder()
        velocity = load_velocity(policy_checkpoint(cfg))
        parts = PolicyParts(velocity, encoder.encode, digits.to_uint8, pixel_shape(velocity))
    else:
        from samplers.sd3 import (
            SD3PromptEncoder,
            latent_shape,
            load_sd3_pipeline,
            make_decoder,
            velocity_of,
        )

        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        pipe = load_sd3_pipeline(str(cfg.pretrained), dtype=_DTYPES[cfg.dtype], device=device)
        parts = PolicyParts(velocity_of(pipe), SD3PromptEncoder(pipe, cfg.max_sequence_length).encode,
                            make_decoder(pipe), latent_shape(pipe, cfg.resolution))
    if cfg.lora is not None:
        add_lora(parts.velocity, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    return parts


def build_sampler(cfg: TrainConfig) -> Sampler:
    parts = load_policy(cfg.policy)
    return Sampler(
        parts.velocity, parts.encode, parts.decode, parts.latent_shape,
        num_steps=cfg.policy.num_steps, shift=cfg.policy.shift, cfg_scale=cfg.policy.cfg_scale,
        keep_states=cfg.rollout.keep_states, kind=cfg.policy.sampler, sde_a=cfg.policy.sde_a,
        sde_window=cfg.policy.sde_window,
    )


def build_learner(cfg: TrainConfig, group: LearnerGroup | None = None) -> Learner:
    """The learner (``group``: its place in a learner group), with the transformer's gradient
    checkpointing switched on when learner.gradient_checkpointing asks for it."""
    parts = load_policy(cfg.policy)
    if cfg.learner.gradient_checkpointing:
        parts.velocity.transformer.enable_gradient_checkpointing()
    return Learner(parts.velocity, parts.encode, cfg.learner_settings(), group)

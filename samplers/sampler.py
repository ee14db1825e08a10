"""A sampler: one policy copy that rolls out trajectories and applies published weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from samplers.policy import SD3Velocity, published_state, state_checksum
from samplers.rollout import euler_rollout
from samplers.sde import draw_window, sde_rollout
from samplers.text import PromptEmbeddings
from samplers.trajectory import Trajectory


class WeightsMismatch(ValueError):
    """Published weights whose checksum does not match their bytes."""


KINDS = ("ode", "sde", "sde_cps")
"""Sampler kinds: the Euler ODE, Flow-GRPO's SDE, the release's coefficients-preserving SDE."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}; valid: {', '.join(KINDS)}")


class Sampler:
    """Rolls out ``velocity`` with the Euler ODE sampler or a Flow-GRPO SDE (``kind``).

    ``sde_window`` = (size, lo, hi): Flow-GRPO-Fast, only ``size`` consecutive steps starting
    at a w0 drawn uniformly from {lo, …, hi − size} per rollout call are stochastic and
    recorded (samplers/sde.py); None: every step of an SDE rollout is.

    encode: prompt strings → embeddings (the empty string is the unconditional prompt);
    decode: final samples (B, C, H, W) → uint8 images (B, H', W', C') for rewards.
    Noise is drawn per prompt from its own seed, so a batch does not depend on how its
    prompts are divided among samplers.
    """

    def __init__(
        self,
        velocity: SD3Velocity,
        encode: Callable[[list[str]], PromptEmbeddings],
        decode: Callable[[torch.Tensor], np.ndarray],
        latent_shape: tuple[int, ...],
        *,
        num_steps: int,
        shift: float = 1.0,
        cfg_scale: float = 1.0,
        keep_states: bool = True,
        kind: str = "ode",
        sde_a: float = 0.7,
        sde_window: tuple[int, int, int] | None = None,
    ) -> None:
        _check_kind(kind)
        if sde_window is not None:
            draw_window(num_steps, *sde_window)  # refuses a window that does not fit
        self.velocity = velocity.eval().requires_grad_(False)
        self.encode = encode
        self.decode = decode
        self.latent_shape = tuple(latent_shape)
        self.num_steps = num_steps
        self.shift = shift
        self.cfg_scale = cfg_scale
        self.keep_states = keep_states
        self.kind = kind
        self.sde_a = sde_a
        self.sde_window = sde_window
        self.version = 0
        self.checksum = state_checksum(published_state(self.velocity))  # as the learner publishes it

    def apply(self, version: int, state: dict[str, torch.Tensor], checksum: str) -> tuple[int, str]:
        """Load published weights after checking their checksum; returns (version, checksum).

        ``state`` may hold a subset of the policy's tensors (an adapted policy publishes only
        its trainable ones); the others keep their values. Nothing is loaded on a mismatch."""
        actual = state_checksum(state)
        if actual != checksum:
            raise WeightsMismatch(f"weights for version {version} fail their checksum "
                                  f"({actual[:12]} != {checksum[:12]}); not applied")
        own = self.velocity.state_dict()
        unknown = sorted(set(state) - set(own))
        wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
        if unknown or wrong:
            raise WeightsMismatch(f"weights for version {version} do not fit this policy: unknown tensors "
                                  f"{unknown[:3]}, wrong shapes {wrong[:3]}; not applied")
        self.velocity.load_state_dict(state, strict=False)
        self.version, self.checksum = int(version), checksum
        return self.version, self.checksum

    def rollout(
        self, prompts: Sequence[str], samples_per_prompt: int, seeds: Sequence[int],
        cfg_scale: float | None = None, kind: str | None = None,
    ) -> Trajectory:
        """``samples_per_prompt`` rollouts of each prompt, noise for prompt i from seeds[i].

        ``cfg_scale`` and ``kind`` override the sampler's own for this call (evaluation
        always uses the deterministic ODE, whatever the training rollouts use)."""
        if not prompts:
            raise ValueError("rollout needs at least one prompt")
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cfg = self.cfg_scale if cfg_scale is None else cfg_scale
        kind = self.kind if kind is None else kind
        _check_kind(kind)
        noise = torch.cat([
            torch.randn((samples_per_prompt, *self.latent_shape), generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ])
        prompt_ids = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
        # noise is drawn on the CPU in float32 (the same numbers on every device); the rollout
        # runs where the policy lives, its state in float32 (the policy casts its inputs to its
        # own dtype, as diffusers' scheduler steps in float32); trajectories come back to the CPU
        param = next(self.velocity.parameters())
        x1 = noise.to(param.device)
        cond = self.encode(list(prompts)).index(prompt_ids).to(param.device)
        uncond = self.encode([""] * len(prompt_ids)).to(param.device) if cfg != 1.0 else None
        log_probs = None
        if kind != "ode":
            # step noise (and the Fast window) from one generator seeded by all the prompts' seeds:
            # SDE batches, unlike ODE ones, depend on how prompts are divided among samplers
            g = torch.Generator().manual_seed(int(sum(int(z) * (i + 1) for i, z in enumerate(seeds)) % (2**63)))
            window = None if self.sde_window is None else draw_window(self.num_steps, *self.sde_window, generator=g)
            states, times, log_probs = sde_rollout(
                self.velocity, x1, cond, num_steps=self.num_steps, shift=self.shift, a=self.sde_a,
                cfg_scale=cfg, uncond=uncond, generator=g, kind="cps" if kind == "sde_cps" else "sde",
                window=window,
            )
            log_probs = log_probs.float().cpu()
        else:
            states, times = euler_rollout(
                self.velocity, x1, cond, num_steps=self.num_steps, shift=self.shift,
                cfg_scale=cfg, uncond=uncond, keep_states=self.keep_states,
            )
        images = self.decode(states[:, -1])
        states, times = states.float().cpu(), times.float().cpu()
        return Trajectory(
            noise=noise, states=states, times=times, images=images,
            prompt_ids=prompt_ids, prompts=tuple(prompts), version=self.version, cfg_scale=cfg,
            log_probs=log_probs,
        )

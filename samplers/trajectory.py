"""The Trajectory contract: what a sampler hands to rewards and the learner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Trajectory:
    """A batch of B rollouts of K sampling steps, all from one policy version.

    Shapes (C, H, W the model space: pixels for digits, latents for SD3):

    noise:      (B, C, H, W) float32, the initial noise x_1 = ε.
    states:     (B, K + 1, C, H, W) float32, x at ``times``; states[:, 0] is ``noise``,
                states[:, K] the final sample x0. Shape (B, 1, C, H, W) holding only x0
                when the sampler was asked not to keep intermediate states.
    times:      (K + 1,) float32, decreasing from 1 to 0 (the shifted SD3 grid).
    images:     (B, H', W', C') uint8, final samples decoded for the reward side.
    prompt_ids: (B,) int64, index of each rollout's prompt in ``prompts``.
    prompts:    the distinct prompt strings of this batch.
    version:    the policy version that produced every rollout here.
    cfg_scale:  classifier-free guidance scale used (1.0 = CFG-free).
    log_probs:  (B, K) float32 per-step transition log-probs (SDE samplers only), else None;
                NaN at a step not recorded (Flow-GRPO-Fast: the Euler steps outside its window).
    """

    noise: torch.Tensor
    states: torch.Tensor
    times: torch.Tensor
    images: np.ndarray
    prompt_ids: torch.Tensor
    prompts: tuple[str, ...]
    version: int
    cfg_scale: float
    log_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b = self.noise.shape[0]
        if self.states.shape[0] != b or self.images.shape[0] != b or self.prompt_ids.shape != (b,):
            raise ValueError(
                f"inconsistent batch sizes: noise {tuple(self.noise.shape)}, states {tuple(self.states.shape)}, "
                f"images {self.images.shape}, prompt_ids {tuple(self.prompt_ids.shape)}"
            )
        if self.states.shape[1] not in (1, self.times.shape[0]):
            raise ValueError(f"states hold {self.states.shape[1]} steps but times has {self.times.shape[0]}")

    @property
    def size(self) -> int:
        return int(self.noise.shape[0])

    @property
    def samples(self) -> torch.Tensor:
        """(B, C, H, W) the final samples x0."""
        return self.states[:, -1]

    def prompt_list(self) -> list[str]:
        """The prompt of every rollout, (B,) strings."""
        return [self.prompts[i] for i in self.prompt_ids.tolist()]

    def rows(self, lo: int, hi: int) -> Trajectory:
        """Rollouts ``lo`` … ``hi`` − 1 (a learner rank's share); ``prompts`` is kept whole, so
        ``prompt_ids`` still index it."""
        if not 0 <= lo < hi <= self.size:
            raise ValueError(f"rows {lo}:{hi} are not within a batch of {self.size}")
        return Trajectory(
            noise=self.noise[lo:hi], states=self.states[lo:hi], times=self.times, images=self.images[lo:hi],
            prompt_ids=self.prompt_ids[lo:hi], prompts=self.prompts, version=self.version,
            cfg_scale=self.cfg_scale, log_probs=None if self.log_probs is None else self.log_probs[lo:hi],
        )

    @staticmethod
    def concat(parts: list[Trajectory]) -> Trajectory:
        """Join batches from one version (e.g. from several samplers) into one."""
        if not parts:
            raise ValueError("nothing to concatenate")
        versions = {p.version for p in parts}
        if len(versions) != 1:
            raise ValueError(f"cannot join trajectories of different policy versions {sorted(versions)}")
        prompts: list[str] = []
        ids = []
        for p in parts:
            remap = []
            for s in p.prompts:
                if s not in prompts:
                    prompts.append(s)
                remap.append(prompts.index(s))
            ids.append(torch.tensor(remap, dtype=torch.int64)[p.prompt_ids])
        lp = [p.log_probs for p in parts]
        return Trajectory(
            noise=torch.cat([p.noise for p in parts]),
            states=torch.cat([p.states for p in parts]),
            times=parts[0].times,
            images=np.concatenate([p.images for p in parts]),
            prompt_ids=torch.cat(ids),
            prompts=tuple(prompts),
            version=parts[0].version,
            cfg_scale=parts[0].cfg_scale,
            log_probs=None if any(x is None for x in lp) else torch.cat(lp),  # type: ignore[arg-type]
        )

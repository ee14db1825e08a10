"""Ray actors: samplers, reward workers and the learner.

Each actor wraps one plain object (``Sampler``, a reward, ``Learner``) and adds
nothing but placement and the object-store hand-offs: trajectories and weights
travel as object references, the driver never holds their tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from learner.learner import WeightsPayload
from samplers.trajectory import Trajectory
from services.config import ResourcesConfig, TrainConfig
from services.rewards import RewardStage, component_means
from services.world import build_learner, build_sampler


class SamplerWorker:
    def __init__(self, cfg: TrainConfig, index: int) -> None:
        torch.set_num_threads(cfg.resources.torch_threads)
        self.index = index
        self.sampler = build_sampler(cfg)

    def apply_weights(self, payload: WeightsPayload) -> tuple[int, str]:
        """Apply published weights; returns the (version, checksum) now in use."""
        return self.sampler.apply(payload.version, payload.state, payload.checksum)

    def rollout(self, prompts: list[str], samples_per_prompt: int, seeds: list[int],
                cfg_scale: float | None = None, kind: str | None = None) -> Trajectory:
        return self.sampler.rollout(prompts, samples_per_prompt, seeds, cfg_scale, kind)

    def version(self) -> tuple[int, str]:
        return self.sampler.version, self.sampler.checksum


class RewardWorker:
    def __init__(self, cfg: TrainConfig) -> None:
        torch.set_num_threads(cfg.resources.torch_threads)
        self.stage = RewardStage(cfg.reward)

    def score(self, *parts: Trajectory) -> dict[str, np.ndarray]:
        """Scores of the concatenated batches: ``scores`` (B,), each component's and their details."""
        images = np.concatenate([p.images for p in parts])
        prompts = [s for p in parts for s in p.prompt_list()]
        return self.stage.score(images, prompts)


class LearnerWorker:
    def __init__(self, cfg: TrainConfig) -> None:
        torch.set_num_threads(cfg.resources.torch_threads)
        self.learner = build_learner(cfg)
        self.reward_cfg = cfg.reward

    def update(self, scored: dict[str, np.ndarray], *parts: Trajectory) -> dict[str, Any]:
        batch = Trajectory.concat(list(parts))
        rewards = torch.tensor(scored["scores"], dtype=torch.float32)  # arrives read-only
        stats = self.learner.update(batch, rewards)
        stats.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                     step=self.learner.step, version=self.learner.version)
        stats.update(component_means(scored, self.reward_cfg))
        if "digits_classifier/correct" in scored:
            stats["accuracy"] = float(np.mean(scored["digits_classifier/correct"]))
        return stats

    def publish(self, current: bool = False) -> WeightsPayload:
        return self.learner.publish(current)

    def save(self, directory: str) -> str:
        return str(self.learner.save(directory))


def _opts(cpus: float, gpus: float) -> dict[str, Any]:
    return {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1}


def start_actors(cfg: TrainConfig) -> tuple[list[Any], Any, Any]:
    """Samplers, reward worker and learner, placed by the declared resources."""
    r: ResourcesConfig = cfg.resources
    samplers = [
        ray.remote(SamplerWorker).options(name=None, **_opts(r.sampler_cpus, r.sampler_gpus)).remote(cfg, i)
        for i in range(r.num_samplers)
    ]
    reward = ray.remote(RewardWorker).options(**_opts(r.reward_cpus, r.reward_gpus)).remote(cfg)
    learner = ray.remote(LearnerWorker).options(**_opts(r.learner_cpus, r.learner_gpus)).remote(cfg)
    return samplers, reward, learner

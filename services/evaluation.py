"""Evaluation of a policy version: reward, held-out classifier accuracy, diversity."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integers (run seed, iteration, prompt index, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def eval_plan(cfg: Any, prompts: list[str] | None = None) -> tuple[list[str], list[int]]:  # noqa: ANN401
    """What every evaluation samples (the run's and ``fmrl eval``'s alike): ``prompts`` (default:
    the run's distinct training prompts) and each prompt's noise seed from ``cfg.eval.seed``."""
    prompts = list(dict.fromkeys(cfg.rollout.prompts)) if prompts is None else prompts
    return prompts, [seed_for(cfg.eval.seed, i) for i in range(len(prompts))]


@dataclass(frozen=True)
class Evaluation:
    """CFG-free samples of one policy version and what they score.

    images: (P, n, H, W, C) uint8, n samples of each of P prompts.
    reward: mean reward over all samples; accuracy: fraction the held-out classifier
    reads as the prompted digit (digits world only, else None); diversity: mean over prompts of the mean pairwise
    Euclidean distance between samples of that prompt (pixels in [0, 1]).
    """

    version: int
    prompts: tuple[str, ...]
    images: np.ndarray
    reward: float
    accuracy: float | None
    diversity: float
    per_prompt_reward: tuple[float, ...]
    per_prompt_diversity: tuple[float, ...]

    def headline(self) -> dict[str, float | None]:
        """The three figures the summary reports."""
        return {"reward": self.reward, "accuracy": self.accuracy, "diversity": self.diversity}

    def save(self, path: Path) -> None:
        """One .npz: the images and the figures (a resumed run reports the original 'before')."""
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "images"}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, images=self.images, meta=np.array(json.dumps(meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Evaluation:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            images = f["images"]
        tuples = {k: tuple(meta[k]) for k in ("prompts", "per_prompt_reward", "per_prompt_diversity")}
        return cls(images=images, **{**meta, **tuples})


def mean_pairwise_distance(images: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of n images (n, ...) with pixels scaled to [0, 1]."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    n = len(x)
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


def evaluation_of(version: int, prompts: list[str], images: np.ndarray, scores: np.ndarray,
                  accuracy: float | None) -> Evaluation:
    """The figures of n samples of each of P prompts: images (P, n, H, W, C) uint8, scores (P·n,)."""
    n = images.shape[1]
    per_reward = scores.reshape(len(prompts), n).mean(1)
    per_div = [mean_pairwise_distance(images[i]) for i in range(len(prompts))]
    return Evaluation(
        version=version, prompts=tuple(prompts), images=images, reward=float(scores.mean()), accuracy=accuracy,
        diversity=float(np.mean(per_div)), per_prompt_reward=tuple(float(x) for x in per_reward),
        per_prompt_diversity=tuple(float(x) for x in per_div),
    )

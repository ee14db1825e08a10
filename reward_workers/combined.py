"""A weighted sum of rewards, reported component by component."""

from __future__ import annotations

import math

import numpy as np

from reward_workers.base import Reward, RewardOutput, check_batch


class WeightedSum:
    """Reward = Σᵢ wᵢ·sᵢ over named components (name, weight, reward).

    details: each component's scores under its name, and its details under "name/key".
    A component that returns scores of the wrong shape or a non-finite score is a
    ValueError naming it, never a silent NaN in the sum.
    """

    name = "weighted_sum"

    def __init__(self, components: list[tuple[str, float, Reward]]) -> None:
        if not components:
            raise ValueError("WeightedSum needs at least one component")
        names = [n for n, _, _ in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate component names: {duplicates}")
        for n, w, _ in components:
            if not n or "/" in n:
                raise ValueError(f"component name {n!r} must be non-empty and contain no '/'")
            if not math.isfinite(w):
                raise ValueError(f"component {n!r} has a non-finite weight {w}")
        self.components = [(n, float(w), r) for n, w, r in components]

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        return combine([(name, weight, reward(images, prompts, metadata)) for name, weight, reward in self.components],
                       len(prompts))


def combine(parts: list[tuple[str, float, RewardOutput | None]], n: int) -> RewardOutput:
    """Σ wᵢ·sᵢ over the components that answered (``None``: an optional reward that did not).

    details: each answering component's scores under its name and its details under
    "name/key"; "name/available" is 1 for those and 0 for the rest (all images).
    """
    total = np.zeros(n, dtype=np.float64)
    details: dict[str, np.ndarray] = {}
    for name, weight, out in parts:
        details[f"{name}/available"] = np.full(n, 0.0 if out is None else 1.0)
        if out is None:
            continue
        scores = np.asarray(out.scores, dtype=np.float64)
        if scores.shape != total.shape:
            raise ValueError(f"component {name!r} returned scores of shape {scores.shape}, "
                             f"expected {total.shape}")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"component {name!r} returned non-finite scores: {scores}")
        total += weight * scores
        details[name] = scores
        details.update({f"{name}/{k}": np.asarray(v) for k, v in out.details.items()})
    return RewardOutput(scores=total, details=details)

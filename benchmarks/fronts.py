"""The arithmetic of the method comparison (benchmarks/algorithms.py): fronts, matched
diversity, samples to a threshold and the significance test. Pure functions of numbers,
tested in tests/test_fronts.py.

A *point* is one method at one setting of its trade-off knob: the mean over seeds of its
final reward and diversity, with the per-seed values kept for the test.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Point:
    """One method at one knob value: per-seed finals and samples-to-threshold."""

    method: str
    knob: str
    rewards: tuple[float, ...]
    diversities: tuple[float, ...]
    heldout: tuple[float, ...] = ()
    reach: dict[float, tuple[int | None, ...]] = field(default_factory=dict)
    rollouts: tuple[int, ...] = ()
    """Per seed, the rollouts the figures above were made with."""
    own: tuple[tuple[float, int], ...] = ()
    """Per seed, the final reward at the run's own (config) budget and that budget's rollouts."""

    @property
    def reward(self) -> float:
        return statistics.fmean(self.rewards)

    @property
    def diversity(self) -> float:
        return statistics.fmean(self.diversities)

    def samples_to(self, threshold: float) -> float | None:
        """Mean rollouts over seeds until the threshold; None when a seed never reached it."""
        hits = self.reach.get(threshold, ())
        if not hits or any(h is None for h in hits):
            return None
        return statistics.fmean(h for h in hits if h is not None)


def samples_to_threshold(rewards: list[float], per_iteration: int, threshold: float, window: int = 5) -> int | None:
    """Rollouts until the moving average of ``window`` iterations' batch reward first reaches
    ``threshold`` (iteration i counts i + 1 batches of ``per_iteration``); None if never.
    Needs a full window: the first candidate is iteration window − 1."""
    for i in range(window - 1, len(rewards)):
        if statistics.fmean(rewards[i - window + 1:i + 1]) >= threshold:
            return (i + 1) * per_iteration
    return None


def budget_iteration(final: int, kept: list[int] | tuple[int, ...], per_iteration: int, budget: int) -> int | None:
    """The iteration whose evaluation stands for a run at an equal rollout ``budget``: its last
    (``final``) when it made no more rollouts than the budget (a shorter run is compared at its
    own, smaller budget, and says so), else the kept checkpoint made with exactly the budget's
    rollouts; None when that checkpoint was not kept (the run cannot be compared there)."""
    if final * per_iteration <= budget:
        return final
    at = budget // per_iteration
    return at if at * per_iteration == budget and at in kept else None


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b in reward and diversity and better in one."""
    return (a.reward >= b.reward and a.diversity >= b.diversity
            and (a.reward > b.reward or a.diversity > b.diversity))


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point dominates, by increasing diversity."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: p.diversity)


def front_gap(p: Point, front: list[Point]) -> float:
    """How far ``p`` lies below the front in reward at its own diversity: the largest reward of
    a front point with at least p's diversity, minus p's reward (0 when p is on the front or
    no front point keeps as much diversity)."""
    better = [q.reward for q in front if q.diversity >= p.diversity]
    return max(0.0, max(better) - p.reward) if better else 0.0


def matched_diversity(base_diversity: float, keep: float) -> float:
    """The diversity floor of a matched comparison: a fraction ``keep`` of the base policy's.
    Methods are compared only by their points at or above it, so that none wins reward by
    spending diversity the others kept. A fixed fraction of the base (not the least any
    method reaches) keeps the floor meaningful when a method was measured at one setting only:
    such a method simply has no point above a floor it cannot keep."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    return keep * base_diversity


def best_at_diversity(points: list[Point], method: str, floor: float, family: bool = False) -> Point | None:
    """The method's highest-reward point whose mean diversity is at least ``floor``;
    ``family``: among the method and its variants (methods named ``<method>_…``)."""
    ok = [p for p in points if (p.method == method or (family and p.method.startswith(method + "_")))
          and p.diversity >= floor - 1e-12]
    return max(ok, key=lambda p: p.reward) if ok else None


def welch(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    """Welch's two-sided t-test of equal means: (t, p). p is 1.0 when both samples have zero
    variance and equal means, 0.0 when they have zero variance and different means."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least two values per side, got {len(a)} and {len(b)}")
    va, vb = statistics.variance(a), statistics.variance(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), 0.0)
    from scipy import stats

    t = diff / math.sqrt(se2)
    dof = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return t, float(2.0 * stats.t.sf(abs(t), dof))


def verdict(p: float, alpha: float = 0.05) -> str:
    """The words the docs may use for a p-value."""
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return shown + ("" if p < alpha else ", not significant")

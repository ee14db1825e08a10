"""benchmarks/fronts.py: the front, matched diversity, samples to a threshold and Welch's test
on hand-computed numbers (the comparison in docs/algorithms_results.md rests on them)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fronts as fr  # noqa: E402


def pt(method: str, knob: str, r: float, d: float, reach: tuple[int | None, ...] = ()) -> fr.Point:
    return fr.Point(method, knob, (r,), (d,), reach={0.9: reach} if reach else {})


def test_samples_to_threshold_counts_rollouts_to_the_first_full_window_at_the_threshold():
    # windows of 3: means 0.2, 0.5, 0.8, 0.9 → the fourth window (iterations 3..5) reaches 0.9
    rewards = [0.0, 0.3, 0.3, 0.9, 0.9, 0.9]
    assert fr.samples_to_threshold(rewards, 10, 0.9, window=3) == 60
    assert fr.samples_to_threshold(rewards, 10, 0.5, window=3) == 40  # (0.3 + 0.3 + 0.9)/3 = 0.5
    assert fr.samples_to_threshold(rewards, 10, 0.95, window=3) is None
    assert fr.samples_to_threshold([1.0, 1.0], 10, 0.5, window=3) is None  # never a full window


def test_the_front_keeps_exactly_the_undominated_points_and_the_gap_is_read_at_equal_diversity():
    a = pt("a", "x=1", 0.90, 1.0)
    b = pt("b", "x=1", 0.95, 0.8)
    c = pt("c", "x=1", 0.85, 0.9)   # dominated by a (0.90 ≥ 0.85, 1.0 ≥ 0.9)
    d = pt("d", "x=1", 0.99, 0.5)
    e = pt("e", "x=1", 0.90, 1.0)   # equal to a: neither dominates
    front = fr.pareto_front([a, b, c, d, e])
    assert [p.method for p in front] == ["d", "b", "a", "e"]
    assert not fr.dominates(a, e) and not fr.dominates(e, a) and fr.dominates(a, c)


def test_front_gap_uses_only_points_that_keep_at_least_as_much_diversity():
    a, b, d = pt("a", "", 0.90, 1.0), pt("b", "", 0.95, 0.8), pt("d", "", 0.99, 0.5)
    front = fr.pareto_front([a, b, d])
    c = pt("c", "", 0.85, 0.9)
    assert fr.front_gap(c, front) == pytest.approx(0.05)   # only a (d = 1.0 ≥ 0.9): 0.90 − 0.85
    assert fr.front_gap(pt("f", "", 0.80, 0.7), front) == pytest.approx(0.15)  # b and a: max 0.95
    assert fr.front_gap(pt("g", "", 0.5, 2.0), front) == 0.0  # nobody keeps 2.0
    assert fr.front_gap(b, front) == 0.0


def test_matched_diversity_is_a_fraction_of_the_base_and_the_best_point_above_it_wins():
    pts = [pt("m", "k=1", 0.99, 0.6), pt("m", "k=2", 0.90, 1.4),
           pt("n", "k=1", 0.97, 0.9), pt("n", "k=2", 0.93, 1.1),
           pt("m_centred", "k=1", 0.95, 1.2), pt("o", "k=1", 1.0, 0.4)]
    floor = fr.matched_diversity(2.0, 0.5)
    assert floor == pytest.approx(1.0)  # half the base's diversity
    assert fr.best_at_diversity(pts, "m", floor).knob == "k=2"  # 0.90 at 1.4; k=1 spends too much
    assert fr.best_at_diversity(pts, "n", floor).knob == "k=2"
    assert fr.best_at_diversity(pts, "o", floor) is None  # measured only below the floor
    # the family: m and its variants m_…; the variant's 0.95 at 1.2 beats m's own 0.90
    best = fr.best_at_diversity(pts, "m", floor, family=True)
    assert (best.method, best.reward) == ("m_centred", 0.95)
    assert fr.best_at_diversity(pts, "n", 1.5) is None
    with pytest.raises(ValueError, match="keep must lie"):
        fr.matched_diversity(2.0, 0.0)


def test_welch_matches_scipy_and_the_hand_computed_statistic():
    a, b = (0.95, 0.96, 0.97), (0.93, 0.95, 0.94)
    t, p = fr.welch(a, b)
    # means 0.96 and 0.94, variances 1e-4 each: se = sqrt(2e-4/3) = 0.0081650, t = 0.02/0.0081650 = 2.4495
    assert t == pytest.approx(2.449490, rel=1e-5)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert fr.welch((1.0, 1.0), (1.0, 1.0)) == (0.0, 1.0)
    assert fr.welch((1.0, 1.0), (0.5, 0.5)) == (math.inf, 0.0)
    assert fr.verdict(0.2) == "p = 0.200, not significant" and fr.verdict(0.01) == "p = 0.010"
    assert fr.verdict(0.0004) == "p < 0.001"
    with pytest.raises(ValueError, match="two values per side"):
        fr.welch((1.0,), (1.0, 2.0))


def test_a_point_reports_samples_only_when_every_seed_got_there():
    p = fr.Point("m", "k", (0.9, 0.9), (1.0, 1.0), reach={0.9: (100, 300)})
    assert p.samples_to(0.9) == 200.0 and p.reward == 0.9
    assert fr.Point("m", "k", (0.9,), (1.0,), reach={0.9: (100, None)}).samples_to(0.9) is None


def test_a_run_is_read_at_the_equal_budget_its_own_last_iteration_or_the_checkpoint_made_with_it():
    # 160 rollouts an iteration, budget 24,000 = 150 iterations
    assert fr.budget_iteration(150, [100, 150], 160, 24_000) == 150    # made exactly the budget: its last
    assert fr.budget_iteration(100, [50, 100], 160, 24_000) == 100     # made fewer: its own, smaller budget
    assert fr.budget_iteration(200, [150, 200], 160, 24_000) == 150    # made more: the checkpoint at 24,000
    assert fr.budget_iteration(200, [100, 200], 160, 24_000) is None   # that checkpoint was not kept
    assert fr.budget_iteration(200, [150, 200], 170, 24_000) is None   # no iteration makes exactly 24,000

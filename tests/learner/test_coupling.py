"""Minibatch OT coupling: optimal on small problems, restricted to prompt groups."""

import itertools

import pytest
import torch

from learner.coupling import couple, ot_permutation


def _cost(x0, noise):
    return float((x0 - noise).pow(2).sum())


def test_ot_permutation_is_optimal_by_brute_force():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 2, 2, generator=g), torch.randn(5, 2, 2, generator=g)
    perm = ot_permutation(x0, noise)
    best = min(_cost(x0, noise[list(p)]) for p in itertools.permutations(range(5)))
    assert _cost(x0, noise[perm]) == pytest.approx(best, rel=1e-6)
    assert sorted(perm.tolist()) == list(range(5))


def test_hand_case_swaps():
    # x0 = (0, 10), noise = (10, 0): independent cost 200, the swap costs 0
    x0, noise = torch.tensor([[0.0], [10.0]]), torch.tensor([[10.0], [0.0]])
    assert ot_permutation(x0, noise).tolist() == [1, 0]


def test_groups_never_mix_and_independent_is_identity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = couple(x0, noise, groups, "minibatch_ot")
    for grp in (0, 1):
        rows = {tuple(r.tolist()) for r in out[groups == grp]}
        assert rows == {tuple(r.tolist()) for r in noise[groups == grp]}
    assert torch.equal(couple(x0, noise, groups, "independent"), noise)
    with pytest.raises(ValueError, match="unknown coupling"):
        couple(x0, noise, groups, "sinkhorn")

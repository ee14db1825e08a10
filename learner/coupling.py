"""Noise–sample couplings for flow-matching losses on policy samples."""

from __future__ import annotations

from typing import Literal

import torch

Coupling = Literal["independent", "minibatch_ot"]


def ot_permutation(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exact minibatch OT (squared Euclidean cost, σ = 0): the permutation p minimising
    Σ_i ‖x0_i − noise_{p_i}‖², found by the Hungarian algorithm. (B, ...) → (B,) int64."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(len(rows), dtype=torch.int64)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    return perm


def couple(
    x0: torch.Tensor, noise: torch.Tensor, groups: torch.Tensor, mode: Coupling
) -> torch.Tensor:
    """Return ``noise`` reordered to pair with ``x0`` under ``mode``.

    ``groups`` (B,) restricts OT to rows that share a prompt: a sample is paired only
    with noise drawn for its own prompt, so the conditioning stays correct.
    """
    if mode == "independent":
        return noise
    if mode != "minibatch_ot":
        raise ValueError(f"unknown coupling {mode!r}; valid: 'independent', 'minibatch_ot'")
    out = noise.clone()
    for g in torch.unique(groups):
        idx = torch.nonzero(groups == g).flatten()
        out[idx] = noise[idx][ot_permutation(x0[idx], noise[idx])]
    return out

"""AC-Flow: actor–critic flow matching with intermediate feedback (seed 000).

"Fine-tuning Flow Matching Generative Models with Intermediate Feedback" (2025). Only the
abstract was available, so the formulas below are [reconstructed] (ALGORITHMS.md), in the
project's convention (t = 1 noise, t = 0 data):

- shaping: per-prompt normalised rewards r̃, squashed to [−1, 1] (learner.advantages);
- critic: V_φ(x_t, t, c) regresses r̃ from intermediate states (``critic_regression_loss``);
- advantages at intermediate states A(x_t, t) = r̃ − V_φ(x_t, t, c), clipped to ±A_max;
- generalised critic weighting w = g(A) from a named family, normalised to mean 1 over
  the batch (``critic_weights``); exp(τA) with a constant critic is ORW-CFM-W2's weighting;
- actor loss  w·‖v_θ − u‖² + α·‖v_θ − v_ref‖²  (the Wasserstein regulariser of ORW-CFM-W2),
  ``ac_flow_actor_loss``;
- the critic's fit by time: ``explained_variance_by_t`` over equal-width buckets of t.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

from learner.objectives.weighted import weighted_cfm_w2_loss

WeightFamily = Literal["exp", "linear", "softplus"]
WEIGHT_FAMILIES: tuple[str, ...] = ("exp", "linear", "softplus")


def critic_weights(advantages: torch.Tensor, *, family: WeightFamily, tau: float) -> torch.Tensor:
    """w = g(τ·A) normalised to mean 1 over the batch. advantages (B,) → (B,), no gradient.

    exp: exp(τA) — with a constant critic, ORW-CFM-W2's exp(τr) up to the constant factor the
    normalisation removes; linear: max(0, 1 + τA), clipped at 0 so no weight is negative;
    softplus: log(1 + exp(τA)), a smooth positive ramp.
    """
    a = tau * advantages.detach().float()
    if family == "exp":
        w = torch.exp(a - a.max())  # shift for overflow safety; the normalisation removes it
    elif family == "linear":
        w = (1.0 + a).clamp_min(0.0)
    elif family == "softplus":
        w = F.softplus(a)
    else:
        raise ValueError(f"unknown weighting family {family!r}; valid: {', '.join(WEIGHT_FAMILIES)}")
    total = w.sum()
    if total <= 0:
        # every linear weight clipped to zero: no sample is better than the critic expects
        return torch.zeros_like(w)
    return w * (w.numel() / total)


def ac_flow_actor_loss(
    v_theta: torch.Tensor, u: torch.Tensor, v_ref: torch.Tensor, weights: torch.Tensor, *, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample actor loss w·‖v_θ − u‖² + α·‖v_θ − v_ref‖² (shapes as weighted_cfm_w2_loss).

    ``weights`` come from ``critic_weights`` over the whole batch, so micro-batches share
    one normalisation.
    """
    return weighted_cfm_w2_loss(v_theta, u, v_ref, weights, alpha)


def implicit_velocity(v_theta: torch.Tensor, v_anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """[ours] v⁺ = v_anchor + β·(v_θ − v_anchor), DiffusionNFT's implicit positive policy around the
    anchor (its v_old), on which the actor loss is put: the batch's optimum for v⁺ is the paper's,
    so v_θ's is v_anchor + (v⁺* − v_anchor)/β — the same direction, 1/β as far. β = 1 gives v_θ.
    Gradients flow through v_θ only."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"implicit_step must lie in (0, 1], got {beta}")
    return v_anchor.detach() + beta * (v_theta - v_anchor.detach())


def critic_regression_loss(values: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample (V − r̃)². values, targets (B,). Stats: ``explained_variance``
    1 − Var(r̃ − V)/Var(r̃) (1 perfect, 0 no better than the mean, < 0 worse), ``value_mean``."""
    targets = targets.detach().to(values.dtype)
    losses = (values - targets).pow(2)
    var = targets.var(unbiased=False)
    ev = 1.0 - (targets - values.detach()).var(unbiased=False) / var if var > 0 else torch.tensor(float("nan"))
    return losses, {"explained_variance": ev.detach(), "value_mean": values.mean().detach()}


EV_BUCKETS = 4
"""Buckets of t ∈ [0, 1] for the critic's per-time explained variance (equal widths)."""


def explained_variance(values: torch.Tensor, targets: torch.Tensor) -> float:
    """1 − Var(r̃ − V)/Var(r̃) over all elements; 0.0 where it is undefined (fewer than two
    elements, or targets without spread): nothing was there to explain."""
    values, targets = values.detach().double().flatten(), targets.detach().double().flatten()
    var = targets.var(unbiased=False) if targets.numel() > 1 else torch.zeros((), dtype=torch.float64)
    if var <= 0:
        return 0.0
    return float(1.0 - (targets - values).var(unbiased=False) / var)


def explained_variance_by_t(values: torch.Tensor, targets: torch.Tensor, t: torch.Tensor,
                            buckets: int = EV_BUCKETS) -> dict[str, float]:
    """The critic's explained variance within each of ``buckets`` equal-width buckets of t.

    values, targets, t: the same shape (any). Bucket k holds t ∈ [k/n, (k+1)/n) (the last one
    also t = 1). Returns ``explained_variance_t{k}`` for every k, never NaN: a bucket with fewer
    than two rows, or whose targets are all equal, reports 0.0 (see ``explained_variance``).
    """
    t = t.detach().flatten().double()
    idx = (t * buckets).floor().clamp(0, buckets - 1).long()
    values, targets = values.detach().flatten(), targets.detach().flatten()
    return {f"explained_variance_t{k}": explained_variance(values[idx == k], targets[idx == k])
            for k in range(buckets)}

"""ORW-CFM-W2: online reward-weighted conditional flow matching with a W2 regulariser.

Fan et al., "Online Reward-Weighted Fine-Tuning of Flow Matching with Wasserstein
Regularization" (ICLR 2025; seed 001), the loss of their Eq. (12) as released:

    ℓ_i = w_i · ‖v_θ(x_t, t, c) − u‖²  +  α · ‖v_θ(x_t, t, c) − v_ref(x_t, t, c)‖²,
    w_i = exp(τ · r_i)

with x_t = (1 − t)·x0 + t·ε, u = ε − x0 (the project's convention, t = 1 is noise; the
paper's code runs time the other way, which changes no squared norm). x0 are samples
of the rollout policy π_old; the W2 term is evaluated at the same (x_t, t) as the
flow-matching term. Squared norms are means over the non-batch dimensions.

Not in the paper: dividing w by its batch mean (``weight_normalizer``) is an option,
off by default as in the released code.
"""

from __future__ import annotations

import torch

from learner.objectives.weighted import weighted_cfm_w2_loss


def orw_weights(rewards: torch.Tensor, tau: float, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """w = exp(τ·r), divided by ``normalizer`` when one is given. rewards (B,) → (B,)."""
    w = torch.exp(tau * rewards)
    return w if normalizer is None else w / normalizer


def orw_cfm_w2_loss(
    v_theta: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    rewards: torch.Tensor,
    *,
    tau: float,
    alpha: float,
    weight_normalizer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample ORW-CFM-W2 losses.

    v_theta, u, v_ref: (B, C, H, W) the policy's velocity, the target ε − x0 and the
    frozen reference's velocity at the same (x_t, t, c); rewards: (B,) r(x0);
    weight_normalizer: None for the released loss, or the mean of exp(τ·r) over the
    whole batch (scalar tensor) for the batch-normalised option; it is an argument, not
    computed here, so that a micro-batch normalises by its full batch.
    Returns losses (B,) and detached statistics: ``fm`` (mean unweighted FM error),
    ``w2`` (mean ‖v_θ − v_ref‖², the integrand of the paper's W2 bound, Thm. 3),
    ``weight_mean``, ``weight_max`` and ``ess`` (effective sample size fraction
    (Σw)² / (B·Σw²)).
    """
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    weights = orw_weights(rewards.to(v_theta.dtype), tau, weight_normalizer)
    return weighted_cfm_w2_loss(v_theta, u, v_ref, weights, alpha)

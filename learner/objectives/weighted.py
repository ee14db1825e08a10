"""The weighted flow-matching loss with a W2 regulariser, shared by ORW-CFM-W2 and AC-Flow.

    ℓ_i = w_i · ‖v_θ(x_t, t, c) − u‖²  +  α · ‖v_θ(x_t, t, c) − v_ref(x_t, t, c)‖²

Squared norms are means over the non-batch dimensions, so α and the weights do not
depend on the image size. The weights are inputs: each method computes its own.
"""

from __future__ import annotations

import torch


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of squares over every non-batch dimension: (B, ...) → (B,)."""
    return x.pow(2).flatten(1).mean(1)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(Σw)² / (B·Σw²) ∈ [1/B, 1]: 1 for uniform weights, 1/B when one sample carries all.

    Computed on w / max(w) (the ratio is scale-free), so raw weights such as exp(40·r) ≈ 2e17,
    whose (Σw)² overflows float32, still give a number; all-zero weights give 0.
    """
    top = w.max()
    if top <= 0:
        return torch.zeros((), dtype=w.dtype)
    w = w / top
    return w.sum() ** 2 / (w.numel() * w.pow(2).sum())


def weighted_cfm_w2_loss(
    v_theta: torch.Tensor, u: torch.Tensor, v_ref: torch.Tensor, weights: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample w·FM + α·W2. v_theta, u, v_ref: (B, C, H, W); weights: (B,), used as constants.

    Returns losses (B,) and detached ``fm``, ``w2`` (the integrand of ORW-CFM-W2's Thm. 3
    bound on W2²(π_θ, π_ref)), ``weight_mean``, ``weight_max`` and ``ess``.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    w = weights.to(v_theta.dtype).detach()
    fm = sq_norm(v_theta - u)
    w2 = sq_norm(v_theta - v_ref.detach())
    losses = w * fm + alpha * w2
    return losses, {
        "fm": fm.mean().detach(),
        "w2": w2.mean().detach(),
        "weight_mean": w.mean(),
        "weight_max": w.max(),
        "ess": effective_sample_size(w),
    }

"""AdvantageFlow: advantage-weighted least squares in data-prediction space.

Seed 002, "AdvantageFlow: Advantage-Weighted Least Squares for RL in Flow Models". Only
the abstract was available; the loss below is the form a later paper restates
(ALGORITHMS.md, "AdvantageFlow") [restated], not an equation read from the paper:

    ℓ_i = A_i · ‖f_θ − x0‖²  +  γ · ‖f_θ − f_old‖²  +  λ · ‖f_θ − f_ref‖²

with f = x_t − t·v the data prediction of a velocity v at (x_t, t, c) for the learner θ,
the rollout policy π_old (an EMA of the learner) and the frozen reference, in the
project's convention (t ∈ [0, 1], t = 1 is noise, x_t = (1 − t)·x0 + t·ε). A_i is the
signed advantage of the rollout sample x0 (prompt-centred reward over the global std,
clipped to [−A_max, A_max]). Squared norms are means over the non-batch dimensions, as
in every objective here.

Per sample the loss is a quadratic in f_θ with curvature A + γ + λ, so it is strictly
convex iff A + γ + λ > 0, and then its minimiser is

    f* = (A·x0 + γ·f_old + λ·f_ref) / (A + γ + λ)

(``advantage_flow_target``): positive A pulls f_θ towards the sample, negative A pushes
it away, past the rollout output. ``check_convexity`` rejects (γ, λ, A_max) for which some
admissible A breaks this; call it where the configuration is validated.

Optional [restated, "as in DiffusionNFT"; the divisor is DiffusionNFT's code]:
``adaptive_norm`` divides each sample's loss by sg(max(mean|f_θ − x0|, 1e-5)). The
divisor is a stop-gradient positive per-sample scale, so it changes step sizes but not
the per-sample minimiser.
"""

from __future__ import annotations

import torch

from learner.objectives.weighted import sq_norm

ADAPTIVE_NORM_FLOOR = 1e-5
"""Lower bound on the adaptive divisor, DiffusionNFT's value [code]."""


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) to broadcast against ``like`` (B, ...)."""
    return a.reshape(a.shape[0], *([1] * (like.dim() - 1)))


def check_convexity(gamma: float, lam: float, a_max: float) -> None:
    """Raise ``ValueError`` unless the loss is strictly convex for every A in [−A_max, A_max].

    The per-sample curvature is A + γ + λ; its smallest value over admissible advantages is
    γ + λ − A_max, which must be > 0 (ALGORITHMS.md: reject γ + λ − A_max ≤ 0 at config
    time). The defaults γ = 1.1, λ = 1e-3 with A_max = 1 give a margin of 0.101.
    """
    if a_max < 0:
        raise ValueError(f"A_max bounds |A| and must be non-negative, got A_max={a_max}")
    margin = gamma + lam - a_max
    if not margin > 0:
        raise ValueError(
            "AdvantageFlow's loss is strictly convex only when A + γ + λ > 0 for every "
            f"A ≥ −A_max, i.e. it needs γ + λ − A_max > 0; got γ={gamma}, λ={lam}, "
            f"A_max={a_max}: γ + λ − A_max = {margin:g}. With A = −A_max the per-sample "
            "loss would have no minimiser (it is pushed away from x0 without bound); raise "
            "γ (rollout regularisation) or λ, or clip advantages to a smaller A_max."
        )


def advantage_flow_target(
    x0: torch.Tensor,
    f_old: torch.Tensor,
    f_ref: torch.Tensor,
    advantages: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """The per-sample minimiser f* = (A·x0 + γ·f_old + λ·f_ref) / (A + γ + λ).

    x0, f_old, f_ref: (B, C, H, W); advantages: (B,). Returns (B, C, H, W). Raises
    ``ValueError`` if some A + γ + λ ≤ 0, where the loss has no minimiser (this reads the
    tensor, so it is for tests and diagnostics, not the training hot path).
    """
    curvature = advantages.to(x0.dtype) + gamma + lam
    if bool((curvature <= 0).any()):
        raise ValueError(
            f"A + γ + λ must be > 0 for a minimiser to exist; got min {float(curvature.min()):g} "
            f"(γ={gamma}, λ={lam})"
        )
    a = _per_sample(advantages.to(x0.dtype), x0)
    return (a * x0 + gamma * f_old + lam * f_ref) / _per_sample(curvature, x0)


def advantage_flow_loss(
    f_theta: torch.Tensor,
    x0: torch.Tensor,
    f_old: torch.Tensor,
    f_ref: torch.Tensor,
    advantages: torch.Tensor,
    *,
    gamma: float = 1.1,
    lam: float = 1e-3,
    adaptive_norm: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample AdvantageFlow losses.

    f_theta, f_old, f_ref: (B, C, H, W) data predictions x_t − t·v of the learner, the
    rollout policy and the frozen reference at the same (x_t, t, c); x0: (B, C, H, W) the
    rollout sample that x_t interpolates; advantages: (B,) signed A. f_old, f_ref and A are
    constants (detached); only f_theta carries a gradient. Defaults γ = 1.1, λ = 1e-3
    [restated]. ``adaptive_norm`` divides each loss by sg(max(mean|f_θ − x0|, 1e-5)).

    Convexity (A + γ + λ > 0) is not checked here, since A is data: validate
    (γ, λ, A_max) once with ``check_convexity`` and clip A to [−A_max, A_max] upstream.

    Returns losses (B,) and detached statistics: ``fm`` (mean ‖f_θ − x0‖²),
    ``rollout_reg`` (mean ‖f_θ − f_old‖²), ``ref_reg`` (mean ‖f_θ − f_ref‖²), all before
    any adaptive normalisation; ``adv_mean``, ``adv_std`` (population std, so a batch of
    one gives 0, not NaN) and ``neg_fraction`` (share of A < 0).
    """
    if gamma < 0 or lam < 0:
        raise ValueError(f"gamma and lam must be non-negative, got gamma={gamma}, lam={lam}")
    a = advantages.detach().to(f_theta.dtype)
    fm = sq_norm(f_theta - x0)
    rollout_reg = sq_norm(f_theta - f_old.detach())
    ref_reg = sq_norm(f_theta - f_ref.detach())
    losses = a * fm + gamma * rollout_reg + lam * ref_reg
    if adaptive_norm:
        with torch.no_grad():
            scale = (f_theta - x0).abs().flatten(1).mean(1).clamp_min(ADAPTIVE_NORM_FLOOR)
        losses = losses / scale
    stats = {
        "fm": fm.mean().detach(),
        "rollout_reg": rollout_reg.mean().detach(),
        "ref_reg": ref_reg.mean().detach(),
        "adv_mean": a.mean(),
        "adv_std": a.std(unbiased=False),
        "neg_fraction": (a < 0).to(f_theta.dtype).mean(),
    }
    return losses, stats

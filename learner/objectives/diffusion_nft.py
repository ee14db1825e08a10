"""DiffusionNFT: negative-aware fine-tuning on the forward process (a baseline).

Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"
(arXiv 2509.16117). The implicit positive and negative policies are reflections of the
trained velocity about the frozen rollout (old) velocity:

    v⁺ = (1 − β)·v_old + β·v_θ,     v⁻ = (1 + β)·v_old − β·v_θ
    ℓ_i = r_i·‖v⁺ − u‖² + (1 − r_i)·‖v⁻ − u‖²   (+ w_ref·‖v_θ − v_ref‖²)
    r_i = clip(A_i / A_max / 2 + 0.5, 0, 1)

with u = ε − x0, x_t = (1 − t)·x0 + t·ε (the project's convention, t = 1 is noise) and
squared norms as means over the non-batch dimensions. This is the velocity-space form
ALGORITHMS.md specifies.

The released code [code] evaluates both branches in data-prediction space,
x0̂ = x_t − t·v, divides each branch by its own sg(max(mean|x0̂ − x0|, 1e-5)) ("adaptive
weighting"), scales the sum by A_max/β, and adds a small ‖v_θ − v_ref‖² term; defaults
β = 1 (0.1 for OCR), A_max = 5. Since x0̂ − x0 = t·(u − v), its unnormalised x0-space
branches are t² times the ones here: a per-sample positive weight, which changes step
sizes, not the per-sample minimiser. That form is not implemented here.

Relation to AdvantageFlow [restated, the algebra checked in the tests]: with Â = 2r − 1
(= A/A_max inside the clip),

    ℓ_i = β·[Â·‖v_θ − u‖² + (β − Â)·‖v_θ − v_old‖²] + (1 − β·Â)·‖v_old − u‖²,

i.e. β times AdvantageFlow's loss with advantage Â, γ(Â) = β − Â and λ = 0, plus a term
constant in θ. Its curvature Â + γ = β > 0, so DiffusionNFT is convex for every r.
"""

from __future__ import annotations

import torch

from learner.objectives.weighted import sq_norm


def nft_optimality(advantages: torch.Tensor, a_max: float) -> torch.Tensor:
    """Optimality probability r = clip(A / A_max / 2 + 0.5, 0, 1). advantages (B,) → (B,)."""
    if not a_max > 0:
        raise ValueError(f"a_max must be positive, got a_max={a_max}")
    return (advantages / a_max / 2.0 + 0.5).clamp(0.0, 1.0)


def diffusion_nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    u: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    v_ref: torch.Tensor | None = None,
    ref_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample DiffusionNFT losses in velocity space.

    v_theta, v_old: (B, C, H, W) the trained and the rollout policy's velocities at the same
    (x_t, t, c); u: (B, C, H, W) the target ε − x0; r: (B,) optimality probabilities in
    [0, 1] (``nft_optimality``); v_ref: (B, C, H, W) the frozen reference's velocity,
    required when ref_weight > 0. v_old, v_ref and r are constants (detached).

    Returns losses (B,) and detached statistics: ``fm`` (mean ‖v_θ − u‖²), ``pos`` (mean
    ‖v⁺ − u‖²), ``neg`` (mean ‖v⁻ − u‖²), ``old_gap`` (mean ‖v_θ − v_old‖², the size of the
    step away from the rollout policy), ``r_mean``, and ``ref_reg`` (mean ‖v_θ − v_ref‖²)
    whenever v_ref is given.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got beta={beta}")
    if ref_weight < 0:
        raise ValueError(f"ref_weight must be non-negative, got ref_weight={ref_weight}")
    if ref_weight > 0 and v_ref is None:
        raise ValueError(f"ref_weight={ref_weight} > 0 needs v_ref, the reference velocity")
    old = v_old.detach()
    r = r.detach().to(v_theta.dtype)
    v_pos = (1.0 - beta) * old + beta * v_theta
    v_neg = (1.0 + beta) * old - beta * v_theta
    pos = sq_norm(v_pos - u)
    neg = sq_norm(v_neg - u)
    losses = r * pos + (1.0 - r) * neg
    stats = {
        "fm": sq_norm(v_theta - u).mean().detach(),
        "pos": pos.mean().detach(),
        "neg": neg.mean().detach(),
        "old_gap": sq_norm(v_theta - old).mean().detach(),
        "r_mean": r.mean(),
    }
    if v_ref is not None:
        ref_reg = sq_norm(v_theta - v_ref.detach())
        if ref_weight > 0:
            losses = losses + ref_weight * ref_reg
        stats["ref_reg"] = ref_reg.mean().detach()
    return losses, stats

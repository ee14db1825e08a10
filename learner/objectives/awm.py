"""AWM: Advantage Weighted Matching (a forward-process baseline) [code].

Xue, Ge, Zhang, Li, Ma, "Advantage Weighted Matching: Aligning RL with Pretraining in
Diffusion Models", arXiv 2509.25050 (2025). The paper shows that DDPO's policy gradient is a
denoising (flow-matching) objective with a noisy target, and replaces the per-step
log-likelihood of the reverse process by the pretraining loss itself: the log-likelihood
surrogate of a final sample x0 at time t is −‖v_θ(x_t, t, c) − u‖², and the policy gradient
weights it by the advantage. Transcribed from the released code
(github.com/scxue/advantage_weighted_matching at be51372, ``advantage_weighted_matching/scripts/train_sd3_awm.py``:
``compute_log_prob_awm`` lines 210–252, the loss lines 1293–1354):

    ℓ      = −mean((v_θ − u)²)                            over every non-batch element
    log p  = uniform: ℓ      t: t·ℓ      t2: t²·ℓ
             huber:  −(sqrt(−ℓ + 1e-10) − 1e-5)·t
             ghuber: −((−ℓ + 1e-10)^p − (1e-10)^p)·t/p      (released: ghuber, p = 0.25)
    ratio  = exp(log p_θ − log p_old)                      (1 on-policy: then ∇ = −A·∇log p_θ)
    L_i    = max(−A·ratio, −A·clip(ratio, 1 − c, 1 + c)) + β·mean((v_θ − v_ref)²) + β_old·mean((v_θ − v_old)²)

Time convention: the project's (t = 1 noise, t = 0 data, x_t = (1 − t)·x0 + t·ε, u = ε − x0),
which is the released code's too (``noised = (1 − t)·clean + t·noise``, target noise − clean).
The released log-likelihood is computed in float64; so is this one.
"""

from __future__ import annotations

from typing import Literal

import torch

from learner.objectives.weighted import sq_norm

AWMWeighting = Literal["uniform", "t", "t2", "huber", "ghuber"]
AWM_WEIGHTINGS: tuple[str, ...] = ("uniform", "t", "t2", "huber", "ghuber")
_TINY = 1e-10  # the released code's floor inside the (generalised) Huber root


def awm_log_prob(v: torch.Tensor, u: torch.Tensor, t: torch.Tensor, *, weighting: AWMWeighting = "ghuber",
                 power: float = 0.25) -> torch.Tensor:
    """AWM's log-likelihood surrogate per sample, float64. v, u (B, C, H, W); t (B,) → (B,)."""
    ell = -(v.double() - u.double()).pow(2).flatten(1).mean(1)
    t = t.double().reshape(-1)
    if weighting == "uniform":
        return ell
    if weighting == "t":
        return ell * t
    if weighting == "t2":
        return ell * t**2
    if weighting == "huber":
        return -(torch.sqrt(-ell + _TINY) - 1e-5) * t
    if weighting == "ghuber":
        floor = torch.tensor(_TINY, dtype=torch.float64, device=ell.device) ** power
        return -((-ell + _TINY).pow(power) - floor) * t / power
    raise ValueError(f"unknown AWM weighting {weighting!r}; valid: {', '.join(AWM_WEIGHTINGS)}")


def awm_loss(
    v_theta: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    old_log_prob: torch.Tensor,
    *,
    weighting: AWMWeighting = "ghuber",
    power: float = 0.25,
    clip_range: float = 1.0,
    v_ref: torch.Tensor | None = None,
    beta: float = 0.0,
    v_old: torch.Tensor | None = None,
    old_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row AWM loss. v_theta, u, v_ref, v_old: (B, C, H, W); t, advantages, old_log_prob (π_old's
    ``awm_log_prob`` at the same x_t, t, ε): (B,). A row is one (sample, t) pair.

    Returns losses (B,) in v_theta's dtype and detached ``policy``, ``kl`` (β's term, unscaled),
    ``kl_old`` (β_old's), ``ratio_mean`` and ``clip_fraction`` (|ratio − 1| > c).
    """
    if beta < 0 or old_beta < 0 or clip_range <= 0:
        raise ValueError(f"need beta, old_beta ≥ 0 and clip_range > 0, got {beta}, {old_beta}, {clip_range}")
    log_prob = awm_log_prob(v_theta, u, t, weighting=weighting, power=power)
    ratio = torch.exp(log_prob - old_log_prob.detach().double())
    a = advantages.detach().double()
    policy = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    zero = torch.zeros_like(policy)
    kl = sq_norm(v_theta.double() - v_ref.detach().double()) if v_ref is not None and beta > 0 else zero
    kl_old = sq_norm(v_theta.double() - v_old.detach().double()) if v_old is not None and old_beta > 0 else zero
    losses = policy + beta * kl + old_beta * kl_old
    return losses.to(v_theta.dtype), {
        "policy": policy.mean().detach().float(),
        "kl": kl.mean().detach().float(),
        "kl_old": kl_old.mean().detach().float(),
        "ratio_mean": ratio.mean().detach().float(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).double().mean().detach().float(),
    }

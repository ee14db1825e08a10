"""Flow-GRPO: the clipped GRPO/PPO surrogate on one SDE step, with a KL to the reference.

Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (2025, arXiv
2505.05470). The policy is the SDE sampler of ``samplers/sde.py`` (t = 1 noise, t = 0
data; a step t → s < t is Gaussian with mean μ and std σ_t·sqrt(|Δt|)). For one step
of B trajectories, with r = p_θ(x_s | x_t) / p_old(x_s | x_t) = exp(log p_θ − log p_old):

    ℓ_i = max(−A_i·r_i, −A_i·clip(r_i, 1 − ε, 1 + ε))  +  β·‖μ_θ − μ_ref‖² / (2·std²)

which is the negative of the paper's GRPO objective min(r·A, clip(r)·A) − β·D_KL for
that step [paper]; the paper averages it over the group and the steps, which the
learner does here (per-sample losses, the learner owns reduction).

Sources of the details:
- The clipped surrogate, its ε (1e-4 in the released configs, the default here) and
  β (0.04 GenEval/OCR, 0.01 PickScore) [paper][code].
- Log-probs are per-step Gaussian log-densities averaged over dimensions, computed by
  ``samplers.sde`` [code]; advantages are given, already normalised ((r − group mean)
  / std) and clipped to ±5 by the caller [code].
- The KL term is ‖μ_θ − μ_ref‖² / (2·std²), the squared norm a mean over the non-batch
  dimensions [code]. The released ``scripts/train_sd3.py`` (@ ac4c86e L895) divides by
  2·std_dev_t², std_dev_t the noise level σ_t = a·sqrt(t/(1 − t)) without the step's
  sqrt(|Δt|) (``samplers.sde.noise_level``); that is the rule's default. The step std
  σ_t·sqrt(|Δt|) gives the exact per-step KL between the two Gaussians [paper], an option.
- Which steps train and which samples: ``num_train_timesteps`` and
  ``nonzero_advantage_mask`` transcribe the release (docstrings).
- ``clip_fraction`` counts |r − 1| > ε, as the released code logs it [code];
  ``approx_kl`` is the mean of (log p_old − log p_θ), an estimate of KL(π_old ‖ π_θ)
  (the released code logs 0.5·mean((log p_θ − log p_old)²) instead).
"""

from __future__ import annotations

import torch


def flow_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 1e-4,
    mean_theta: torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    std: torch.Tensor | float | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample Flow-GRPO losses for one SDE step.

    log_prob: (B,) log p_θ(x_s | x_t) under the weights being trained (with grad);
    old_log_prob: (B,) the same under the rollout policy, recorded at sampling;
    advantages: (B,) A_i, constant within a trajectory;
    mean_theta, mean_ref: (B, C, H, W) the step means under θ and the frozen reference;
    std: the Gaussian std dividing the KL, a scalar, (B,) or broadcastable to the means.
    The three are required when kl_beta > 0; when all are given with kl_beta = 0 the
    KL is still reported.
    Returns losses (B,) and detached statistics: ``clip_fraction`` (share of samples
    with |r − 1| > ε), ``ratio_mean``, ``approx_kl`` (mean of log p_old − log p_θ) and
    ``kl`` (mean of ‖μ_θ − μ_ref‖²/(2·std²), 0 when not computed).
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be non-negative, got {kl_beta}")
    if log_prob.ndim != 1 or old_log_prob.shape != log_prob.shape or advantages.shape != log_prob.shape:
        raise ValueError(
            f"log_prob, old_log_prob and advantages must all be (B,), got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    have_kl = mean_theta is not None and mean_ref is not None and std is not None
    if kl_beta > 0 and not have_kl:
        raise ValueError("kl_beta > 0 needs mean_theta, mean_ref and std")

    adv = advantages.detach().to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    losses = torch.maximum(unclipped, clipped)

    kl = torch.zeros_like(losses)
    if have_kl:
        std_t = torch.as_tensor(std, dtype=mean_theta.dtype, device=mean_theta.device).detach()
        if std_t.ndim == 1:
            std_t = std_t.reshape(-1, *([1] * (mean_theta.ndim - 1)))
        kl = ((mean_theta - mean_ref.detach()).pow(2) / (2.0 * std_t.pow(2))).flatten(1).mean(1)
        if kl_beta > 0:
            losses = losses + kl_beta * kl

    stats = {
        "clip_fraction": ((ratio - 1.0).abs() > clip_eps).float().mean().detach(),
        "ratio_mean": ratio.mean().detach(),
        "approx_kl": (old_log_prob - log_prob).mean().detach(),
        "kl": kl.mean().detach(),
    }
    return losses, stats


def num_train_timesteps(num_steps: int, fraction: float) -> int:
    """Steps trained per trajectory: int(K·fraction), the first ones, k = 0 … n − 1 [code].

    ``scripts/train_sd3.py`` @ ac4c86e L345 (``int(num_steps * timestep_fraction)``) and L864
    (``range(num_train_timesteps)``): with K = 10 and 0.99 the last step (the one into t = 0)
    is not trained. At least one step is kept.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {fraction}")
    return max(1, int(num_steps * fraction))


def nonzero_advantage_mask(advantages: torch.Tensor, num_batches: int = 1,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples train: those whose advantage is not exactly 0 [code].

    ``scripts/train_sd3.py`` @ ac4c86e L797–817: keep = (|A| summed over the steps ≠ 0);
    when the kept count is 0 or not a multiple of ``num_batches`` (its
    ``num_batches_per_epoch``), num_batches − (count mod num_batches) zero-advantage samples,
    drawn at random (``generator``), are put back, if there are that many. advantages: (B,)
    (the release's are constant over steps, so the sum over steps is ≠ 0 iff A ≠ 0). Returns
    a (B,) bool mask.
    """
    keep = advantages != 0
    count = int(keep.sum())
    if count % num_batches != 0 or count == 0:
        dropped = torch.where(~keep)[0]
        need = num_batches - count % num_batches
        if dropped.numel() >= need:
            pick = torch.randperm(dropped.numel(), generator=generator)[:need].to(dropped.device)
            keep[dropped[pick]] = True
    return keep

"""DiffusionNFT: negative-aware fine-tuning on the forward process (a baseline).

Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"
(arXiv 2509.16117). The implicit positive and negative policies are reflections of the
trained velocity about the frozen rollout (old) velocity:

    v⁺ = (1 − β)·v_old + β·v_θ,     v⁻ = (1 + β)·v_old − β·v_θ
    r_i = clip(A_i / A_max / 2 + 0.5, 0, 1)

with x_t = (1 − t)·x0 + t·ε, u = ε − x0 and x0̂ = x_t − t·v (the project's convention, t = 1
is noise; the release's is the same: ``xt = (1 − t)·x0 + t·noise``, ``x0_prediction =
xt − t·v``, t = timestep/1000, ``scripts/train_nft_sd3.py``:864–870, 940). Squared norms
are means over the non-batch dimensions. Two losses:

``diffusion_nft_released_loss`` (``loss: released``, the default) is the released code's
[code] (``scripts/train_nft_sd3.py``:934–970): each branch in data-prediction space,
divided by its own stop-gradient per-sample weight w± = max(mean|x0̂± − x0|, 1e-5)
("adaptive weighting", computed in float64), the sum scaled by A_max/β, plus the reference
term (the release's ``config.train.beta`` = 1e-4, ``config/base.py``:89, always on):

    ℓ_i = (A_max/β)·[r_i·‖x0̂⁺ − x0‖²/w⁺ + (1 − r_i)·‖x0̂⁻ − x0‖²/w⁻] + w_ref·‖v_θ − v_ref‖²

``diffusion_nft_loss`` (``loss: velocity``) is the velocity-space form ALGORITHMS.md states:

    ℓ_i = r_i·‖v⁺ − u‖² + (1 − r_i)·‖v⁻ − u‖²   (+ w_ref·‖v_θ − v_ref‖²)

Since x0̂ − x0 = t·(u − v), the released branches are t²/w± times these: per-sample,
per-branch positive weights, which change step sizes and the balance of the branches, not
the minimiser of a branch.

Relation to AdvantageFlow [restated, the algebra checked in the tests]: with Â = 2r − 1
(= A/A_max inside the clip), the velocity form is

    ℓ_i = β·[Â·‖v_θ − u‖² + (β − Â)·‖v_θ − v_old‖²] + (1 − β·Â)·‖v_old − u‖²,

i.e. β times AdvantageFlow's loss with advantage Â, γ(Â) = β − Â and λ = 0, plus a term
constant in θ. Its curvature Â + γ = β > 0, so DiffusionNFT is convex for every r.

Also here, as pure functions of scalars: the release's training-time draw from the sampling
grid (``nft_training_times``). Its schedules of the old policy's soft update are learner
state: ``learner.pretrain.rollout_ema_decay``, beside the EMA itself.
"""

from __future__ import annotations

import torch

from learner.objectives.weighted import sq_norm

WEIGHT_FLOOR = 1e-5
"""The adaptive weight's lower clip (scripts/train_nft_sd3.py:945, 953)."""


def _with_reference(losses: torch.Tensor, stats: dict[str, torch.Tensor], v_theta: torch.Tensor,
                    v_ref: torch.Tensor | None, ref_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Both losses' reference term: + ref_weight·‖v_θ − v_ref‖², reported as ``ref_reg`` whenever v_ref is given."""
    if v_ref is not None:
        ref_reg = sq_norm(v_theta - v_ref.detach())
        if ref_weight > 0:
            losses = losses + ref_weight * ref_reg
        stats["ref_reg"] = ref_reg.mean().detach()
    return losses, stats


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
    return _with_reference(losses, stats, v_theta, v_ref, ref_weight)


def diffusion_nft_released_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    a_max: float = 5.0,
    v_ref: torch.Tensor | None = None,
    ref_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample DiffusionNFT losses as the released code computes them [code].

    v_theta, v_old: (B, C, H, W) the trained and the old (rollout) policy's velocities at
    (x_t, t, c); x_t, x0: (B, C, H, W) the interpolant and the clean sample; t: (B,) times in
    (0, 1] (t = 1 noise); r: (B,) optimality probabilities (``nft_optimality``); v_ref the frozen
    reference's velocity, required when ref_weight > 0. v_old, v_ref, r and the adaptive
    weights are constants.

        x0̂± = x_t − t·v±,  w± = sg(max(mean|x0̂± − x0|, 1e-5))   (per sample, in float64)
        ℓ = (a_max/β)·[r·mean((x0̂⁺ − x0)²/w⁺) + (1 − r)·mean((x0̂⁻ − x0)²/w⁻)] + ref_weight·mean((v_θ − v_ref)²)

    (scripts/train_nft_sd3.py:934–960 and 966–970; the release averages ℓ over the rows of a
    step, as the learner does.) Returns losses (B,) and detached statistics: ``pos`` and ``neg``
    (mean adaptive-weighted branch losses), ``pos_weight`` and ``neg_weight`` (mean w±),
    ``old_gap`` (mean ‖v_θ − v_old‖²), ``r_mean``, and ``ref_reg`` (mean ‖v_θ − v_ref‖²)
    whenever v_ref is given.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got beta={beta}")
    if not a_max > 0:
        raise ValueError(f"a_max must be positive, got a_max={a_max}")
    if ref_weight < 0:
        raise ValueError(f"ref_weight must be non-negative, got ref_weight={ref_weight}")
    if ref_weight > 0 and v_ref is None:
        raise ValueError(f"ref_weight={ref_weight} > 0 needs v_ref, the reference velocity")
    if t.shape != (v_theta.shape[0],):
        raise ValueError(f"t must be (B,) = ({v_theta.shape[0]},), got {tuple(t.shape)}")
    old = v_old.detach()
    r = r.detach().to(v_theta.dtype)
    tb = t.detach().to(v_theta.dtype).reshape(-1, *([1] * (v_theta.dim() - 1)))
    x0 = x0.detach()
    dims = tuple(range(1, v_theta.dim()))

    def branch(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        err = x_t - tb * v - x0  # x0̂ − x0
        with torch.no_grad():
            w = err.double().abs().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FLOOR).to(err.dtype)
        return (err.pow(2) / w).mean(dim=dims), w.flatten()

    pos, w_pos = branch(beta * v_theta + (1.0 - beta) * old)
    neg, w_neg = branch((1.0 + beta) * old - beta * v_theta)
    losses = (r * pos / beta + (1.0 - r) * neg / beta) * a_max
    stats = {
        "pos": pos.mean().detach(),
        "neg": neg.mean().detach(),
        "pos_weight": w_pos.mean(),
        "neg_weight": w_neg.mean(),
        "old_gap": sq_norm(v_theta - old).mean().detach(),
        "r_mean": r.mean(),
    }
    return _with_reference(losses, stats, v_theta, v_ref, ref_weight)


def grid_times_per_sample(k: int, fraction: float) -> int:
    """M = int(K·fraction), at least 1: how many of a K-step grid's times each sample trains on."""
    return max(1, int(k * fraction))


def nft_training_times(grid: torch.Tensor, samples: int, fraction: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The release's training times: (samples, M) times from the sampling grid [code].

    grid: (K + 1,) the rollout's decreasing times, ending at 0 (``Trajectory.times``); its K
    non-terminal times are the scheduler's timesteps the release trains on. Each sample gets
    its own random permutation of the K times (``torch.randperm``, one per sample in order) and
    keeps the first M = int(K·fraction) of them, so its M times are distinct
    (scripts/train_nft_sd3.py:569, 807–816; ``timestep_fraction`` 0.99 in config/base.py:87,
    i.e. 9 of 10 steps). M is at least 1 (with K = 1 the release would train on nothing).
    Drawn with ``generator`` on its device.
    """
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be the (K + 1,) rollout times, got shape {tuple(grid.shape)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    k = grid.numel() - 1
    m = grid_times_per_sample(k, fraction)
    perms = torch.stack([torch.randperm(k, generator=generator) for _ in range(samples)]) if samples else \
        torch.empty(0, k, dtype=torch.long)
    return grid[:-1].cpu()[perms[:, :m]]

"""Flow-GRPO's reverse-time SDE sampler and its Gaussian transition log-probs.

Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (2025, arXiv
2505.05470): the ODE-to-SDE conversion and its Euler–Maruyama step [paper], in the
project's convention (t = 1 noise, t = 0 data,
x_t = (1 − t)·x0 + t·ε, the model predicts v ≈ ε − x0; ``samplers.flow``). A step
from t to s < t (Δt = s − t < 0) is Gaussian:

    σ_t  = a·sqrt(t / (1 − t))                                      a = 0.7 [paper]
    mean = x_t + [v + σ_t²/(2t)·(x_t + (1 − t)·v)]·Δt
    std  = σ_t·sqrt(|Δt|)
    x_s  = mean + std·z,   z ~ N(0, I)

The SDE has the same marginals as the probability-flow ODE dx/dt = v; a → 0 is the
Euler sampler of ``samplers.rollout``.

Choices, with their sources:
- σ at t = 1 [code]: σ_t is infinite at t = 1, where every rollout starts. The
  released code (``sd3_sde_with_logprob.py``) replaces t by the grid's second time in
  the denominator only, σ_1 = a·sqrt(1 / (1 − t_1)). Here ``sde_sigma`` takes that
  cap as ``t_max`` (σ_t = a·sqrt(t / (1 − min(t, t_max)))); the rollout and the
  learner's recomputation both take it from the recorded grid with ``grid_t_max``, so
  their log-probs agree. On a grid that starts at 1 only the first step is affected.
  A fixed cap close to 1 would be a bad default: at t = 1 the drift factor is
  σ²/(2t)·|Δt| = a²·|Δt| / (2(1 − t_max)), e.g. 0.49·0.04/0.002 ≈ 9.8 for SD3's
  10-step grid and t_max = 0.999, which throws the first state far from N(0, I);
  with the grid's cap it is about a²/2. ``DEFAULT_T_MAX`` only keeps direct calls
  finite.
- Every step is sampled, the last (s = 0) included, and every step's log-prob is
  recorded [code]: the grid's last positive time is above 0 (0.0089 for 10 steps at
  shift 3), so the last step's std is positive.
- Log-probs are the full Gaussian density averaged (not summed) over the non-batch
  dimensions [code]. The step is computed in at least float32 [code: "bf16 can
  overflow here"] and states are stored in float32.
"""

from __future__ import annotations

import math

import torch

from samplers.flow import broadcast_time, sampling_sigmas
from samplers.policy import VelocityModel
from samplers.rollout import guided_velocity
from samplers.text import PromptEmbeddings

DEFAULT_T_MAX = 1.0 - 1e-3
"""Cap on t in σ_t's denominator for calls without a grid; a finiteness guard only."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32: the step's drift term overflows in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def grid_t_max(times: torch.Tensor) -> float:
    """The cap for σ_t on a rollout grid: its largest time below 1 [code].

    times: (K + 1,) decreasing. The released code uses the grid's second sigma in
    place of t = 1; taking the largest time below 1 caps t = 1 only and leaves every
    other grid time as it is.
    """
    below = times[times < 1.0]
    if below.numel() == 0:
        raise ValueError(f"a rollout grid needs a time below 1, got {times.tolist()}")
    return float(below.max())


def sde_sigma(t: torch.Tensor, a: float, *, t_max: float = DEFAULT_T_MAX) -> torch.Tensor:
    """σ_t = a·sqrt(t / (1 − min(t, t_max))), finite at t = 1 for t_max < 1.

    t: a tensor of times in [0, 1], any shape; returns σ of the same shape. Rollouts
    pass ``t_max = grid_t_max(times)`` (module docstring).
    """
    if not 0.0 <= t_max < 1.0:
        raise ValueError(f"t_max must be in [0, 1), got {t_max}")
    t = torch.as_tensor(t)
    return a * torch.sqrt(t / (1.0 - t.clamp(max=t_max)))


def sde_step_mean_std(
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    a: float,
    *,
    t_max: float = DEFAULT_T_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of Flow-GRPO's Gaussian step from t to s < t.

    x_t, v: (B, C, H, W); t, s: (B,) per-sample times or scalars, t in (0, 1].
    Returns mean (B, C, H, W) = x_t + [v + σ_t²/(2t)·(x_t + (1 − t)·v)]·(s − t) and
    std = σ_t·sqrt(t − s), shaped to broadcast over x_t: (B, 1, 1, 1) or a scalar.
    """
    x_t, v = _wide(x_t), _wide(v)
    tb = broadcast_time(torch.as_tensor(t), x_t)
    dt = broadcast_time(torch.as_tensor(s), x_t) - tb
    sigma = sde_sigma(tb, a, t_max=t_max)
    mean = x_t + (v + sigma.pow(2) / (2.0 * tb) * (x_t + (1.0 - tb) * v)) * dt
    return mean, sigma * torch.sqrt(-dt)


def gaussian_log_prob(x_s: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_s; mean, std²) per element, averaged over the non-batch dimensions [code].

    x_s, mean: (B, ...); std broadcastable to them (a scalar or (B, 1, ..., 1)). Returns (B,).
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    z = (x_s - mean) / std
    logp = -0.5 * z.pow(2) - torch.log(std) - _LOG_SQRT_2PI
    return logp.flatten(1).mean(1)


def sde_transition(
    model: VelocityModel,
    x_t: torch.Tensor,
    x_s: torch.Tensor | None,
    t: torch.Tensor,
    s: torch.Tensor,
    cond: PromptEmbeddings,
    *,
    a: float,
    t_max: float,
    cfg_scale: float = 1.0,
    uncond: PromptEmbeddings | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step of ``model``: (x_s, log_prob (B,), mean, std).

    With x_s None the step is sampled (noise from ``generator``); otherwise the given
    x_s is scored, which is the learner's path: gradients reach the model through
    ``mean`` when called under grad. t, s: scalar tensors of the grid; t_max from
    ``grid_t_max``. The mean is returned for Flow-GRPO's KL term to the reference.
    """
    v = guided_velocity(model, x_t, t, cond, uncond, cfg_scale)
    mean, std = sde_step_mean_std(x_t, t, s, v, a, t_max=t_max)
    if x_s is None:
        z = torch.randn(
            mean.shape, generator=generator, dtype=mean.dtype,
            device=generator.device if generator is not None else mean.device,
        ).to(mean.device)
        x_s = (mean + std * z).to(torch.float32)
    return x_s, gaussian_log_prob(_wide(x_s), mean, std), mean, std


def _check(a: float, cfg_scale: float, uncond: PromptEmbeddings | None) -> None:
    if not a > 0:
        raise ValueError(f"a must be positive (a = 0 is the ODE: use euler_rollout), got {a}")
    if cfg_scale != 1.0 and uncond is None:
        raise ValueError("cfg_scale != 1 needs the unconditional embeddings (uncond)")


@torch.no_grad()
def sde_rollout(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: PromptEmbeddings,
    *,
    num_steps: int,
    shift: float = 1.0,
    a: float = 0.7,
    cfg_scale: float = 1.0,
    uncond: PromptEmbeddings | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample from t = 1 to t = 0 with Flow-GRPO's SDE, recording every step's log-prob.

    noise: (B, C, H, W) the initial x_1; cond / uncond: embeddings of B prompts
    (uncond needed when cfg_scale ≠ 1; CFG as in ``guided_velocity``); the step noise
    comes from ``generator``. Returns states (B, K + 1, C, H, W) float32 with
    states[:, 0] = noise and states[:, K] the sample, times (K + 1,) the grid of
    ``sampling_sigmas(num_steps, shift)``, and log_probs (B, K) with log_probs[:, k]
    the log-density of states[:, k + 1] given states[:, k].
    """
    _check(a, cfg_scale, uncond)
    times = sampling_sigmas(num_steps, shift).to(noise.device)
    t_max = grid_t_max(times)
    x = noise.to(torch.float32)
    states, log_probs = [x], []
    for k in range(num_steps):
        x, logp, _, _ = sde_transition(
            model, x, None, times[k], times[k + 1], cond,
            a=a, t_max=t_max, cfg_scale=cfg_scale, uncond=uncond, generator=generator,
        )
        states.append(x)
        log_probs.append(logp)
    return torch.stack(states, dim=1), times, torch.stack(log_probs, dim=1)


def recompute_log_probs(
    model: VelocityModel,
    states: torch.Tensor,
    times: torch.Tensor,
    cond: PromptEmbeddings,
    *,
    a: float,
    cfg_scale: float = 1.0,
    uncond: PromptEmbeddings | None = None,
) -> torch.Tensor:
    """The (B, K) log-probs of recorded transitions under ``model``'s current weights.

    states (B, K + 1, C, H, W) and times (K + 1,) as returned by ``sde_rollout``; a,
    cfg_scale and uncond must be the sampler's. Differentiable when called under
    grad. Holding all K steps' graphs at once costs memory; a learner that backpropagates
    step by step calls ``sde_transition`` per step with ``grid_t_max(times)``.
    """
    _check(a, cfg_scale, uncond)
    if states.shape[1] != times.shape[0]:
        raise ValueError(f"states hold {states.shape[1]} times but times has {times.shape[0]}")
    t_max = grid_t_max(times)
    out = []
    for k in range(times.shape[0] - 1):
        _, logp, _, _ = sde_transition(
            model, states[:, k], states[:, k + 1], times[k], times[k + 1], cond,
            a=a, t_max=t_max, cfg_scale=cfg_scale, uncond=uncond,
        )
        out.append(logp)
    return torch.stack(out, dim=1)

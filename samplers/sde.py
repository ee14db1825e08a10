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

Released code followed ([code] labels; yifan123/flow_grpo):
- ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` @ 54809b5 (``sde_step_with_logprob``):
  L46 σ cap ``sigmas[1]``; L50 noise level σ_t (its ``std_dev_t``, the KL's divisor); L53 the
  SDE mean; L62 the sample; L64–68 the log-density; L89 the mean over dimensions.
- Same file, the ``sde_type == "cps"`` branch (coefficients-preserving sampling), L70–86:
  std = s·sin(a·π/2) (L71), x̂0 = x_t − t·v (L72), x̂1 = x_t + (1 − t)·v (L73),
  mean = (1 − s)·x̂0 + sqrt(s² − std²)·x̂1 (L74), x_s = mean + std·z (L83) and the
  "log-prob" −(x_s − mean)² with every constant and the 1/(2·std²) scale dropped (L85–86),
  then averaged over dimensions (L89). ``cps_log_prob`` transcribes exactly that; sampler and
  learner both use it, so the ratio exp(log p_θ − log p_old) is the release's.
- Flow-GRPO-Fast (``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py``, the SD3
  pipeline of ``scripts/train_sd3_fast.py`` @ 74db691): one window [w0, w0 + size) of
  stochastic steps per pipeline call, w0 = ``random.randint(lo, hi − size)`` (both ends
  inclusive); every other step runs with noise level 0, which for both kinds is the Euler
  step; states and log-probs are kept for the window only. Here ``sde_rollout(window=...)``
  keeps every state (the trajectory contract) and marks the log-probs of ODE steps NaN
  ("not recorded"); ``draw_window`` draws w0 as the release does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from samplers.flow import broadcast_time, euler_step, sampling_sigmas
from samplers.policy import VelocityModel
from samplers.rollout import guided_velocity
from samplers.text import PromptEmbeddings

DEFAULT_T_MAX = 1.0 - 1e-3
"""Cap on t in σ_t's denominator for calls without a grid; a finiteness guard only."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

StepKind = Literal["sde", "cps"]
"""Flow-GRPO's SDE step, or the release's coefficients-preserving step (``sde_type``)."""
STEP_KINDS: tuple[str, ...] = ("sde", "cps")


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


def noise_level(t: torch.Tensor, s: torch.Tensor, a: float, kind: StepKind, *,
                t_max: float = DEFAULT_T_MAX) -> torch.Tensor:
    """The release's ``std_dev_t`` [code]: what its KL divides by (2·std_dev_t²).

    sde: σ_t = a·sqrt(t / (1 − min(t, t_max))) (sd3_sde_with_logprob.py L50), without the
    step's sqrt(|Δt|); cps: s·sin(a·π/2) (L71), which is the cps step's std itself.
    t, s: tensors of the same shape (any); returns that shape.
    """
    if kind == "cps":
        return torch.as_tensor(s) * math.sin(a * math.pi / 2.0)
    return sde_sigma(torch.as_tensor(t), a, t_max=t_max)


def cps_step_mean_std(
    x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor, a: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the release's coefficients-preserving step from t to s < t [code].

    x_t, v: (B, C, H, W); t, s: (B,) or scalars. With std = s·sin(a·π/2),
    x̂0 = x_t − t·v and x̂1 = x_t + (1 − t)·v:  mean = (1 − s)·x̂0 + sqrt(s² − std²)·x̂1
    (sd3_sde_with_logprob.py L71–74). a = 0 gives the Euler step x_t + (s − t)·v.
    Returns mean (B, C, H, W) and std shaped to broadcast over x_t.
    """
    x_t, v = _wide(x_t), _wide(v)
    tb = broadcast_time(torch.as_tensor(t), x_t)
    sb = broadcast_time(torch.as_tensor(s), x_t)
    std = sb * math.sin(a * math.pi / 2.0)
    x0_hat, x1_hat = x_t - tb * v, x_t + (1.0 - tb) * v
    mean = x0_hat * (1.0 - sb) + x1_hat * torch.sqrt((sb.pow(2) - std.pow(2)).clamp(min=0.0))
    return mean, std


def cps_log_prob(x_s: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The release's cps "log-prob": −(x_s − mean)² averaged over the non-batch dimensions.

    Every constant and the 1/(2·std²) scale are dropped, as in sd3_sde_with_logprob.py
    L85–86 and L89 [code]; it is not a normalised density. x_s, mean: (B, ...); returns (B,).
    """
    return -(x_s - mean).pow(2).flatten(1).mean(1)


def step_mean_std(
    kind: StepKind, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor, a: float, *,
    t_max: float = DEFAULT_T_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's mean and std for ``kind`` (``sde_step_mean_std`` or ``cps_step_mean_std``)."""
    if kind == "cps":
        return cps_step_mean_std(x_t, t, s, v, a)
    if kind == "sde":
        return sde_step_mean_std(x_t, t, s, v, a, t_max=t_max)
    raise ValueError(f"unknown step kind {kind!r}; valid: {', '.join(STEP_KINDS)}")


def step_log_prob(kind: StepKind, x_s: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B,) the per-step log-prob the release records for ``kind`` (Gaussian, or cps's)."""
    return cps_log_prob(x_s, mean) if kind == "cps" else gaussian_log_prob(x_s, mean, std)


def draw_window(num_steps: int, size: int, lo: int, hi: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Flow-GRPO-Fast's SDE window [w0, w0 + size): w0 uniform in {lo, …, hi − size} [code].

    The release draws ``random.randint(lo, hi − size)`` once per pipeline call
    (sd3_pipeline_with_logprob_fast.py); here from ``generator``. Raises unless
    0 ≤ lo, hi ≤ num_steps and 1 ≤ size ≤ hi − lo.
    """
    if not (0 <= lo and hi <= num_steps and 1 <= size <= hi - lo):
        raise ValueError(f"an SDE window of {size} steps in [{lo}, {hi}) does not fit {num_steps} steps")
    w0 = int(torch.randint(lo, hi - size + 1, (1,), generator=generator))
    return w0, w0 + size


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
    kind: StepKind = "sde",
    detach_uncond: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic step of ``model``: (x_s, log_prob (B,), mean, std).

    With x_s None the step is sampled (noise from ``generator``); otherwise the given
    x_s is scored, which is the learner's path: gradients reach the model through
    ``mean`` when called under grad. t, s: scalar tensors of the grid (or (B,)); t_max from
    ``grid_t_max``; kind "sde" (Gaussian log-density) or "cps" (the release's cps score).
    CFG as ``guided_velocity`` (``detach_uncond``: no gradient through the unconditional
    branch). The mean is returned for Flow-GRPO's KL term to the reference.
    """
    v = guided_velocity(model, x_t, t, cond, uncond, cfg_scale, detach_uncond=detach_uncond)
    mean, std = step_mean_std(kind, x_t, t, s, v, a, t_max=t_max)
    if x_s is None:
        z = torch.randn(
            mean.shape, generator=generator, dtype=mean.dtype,
            device=generator.device if generator is not None else mean.device,
        ).to(mean.device)
        x_s = (mean + std * z).to(torch.float32)
    return x_s, step_log_prob(kind, _wide(x_s), mean, std), mean, std


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
    kind: StepKind = "sde",
    window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample from t = 1 to t = 0 with Flow-GRPO's SDE (or cps) steps, recording their log-probs.

    noise: (B, C, H, W) the initial x_1; cond / uncond: embeddings of B prompts
    (uncond needed when cfg_scale ≠ 1; CFG as in ``guided_velocity``); the step noise
    comes from ``generator``. ``window`` = (w0, w1): only steps w0 ≤ k < w1 are stochastic
    and recorded, the others are Euler steps with log-prob NaN (Flow-GRPO-Fast); None: every
    step. Returns states (B, K + 1, C, H, W) float32 with states[:, 0] = noise and
    states[:, K] the sample, times (K + 1,) the grid of ``sampling_sigmas(num_steps, shift)``,
    and log_probs (B, K) with log_probs[:, k] the log-prob of states[:, k + 1] given states[:, k].
    """
    _check(a, cfg_scale, uncond)
    if window is not None and not 0 <= window[0] < window[1] <= num_steps:
        raise ValueError(f"window {window} is not within the {num_steps} steps")
    times = sampling_sigmas(num_steps, shift).to(noise.device)
    t_max = grid_t_max(times)
    x = noise.to(torch.float32)
    states, log_probs = [x], []
    for k in range(num_steps):
        if window is None or window[0] <= k < window[1]:
            x, logp, _, _ = sde_transition(
                model, x, None, times[k], times[k + 1], cond,
                a=a, t_max=t_max, cfg_scale=cfg_scale, uncond=uncond, generator=generator, kind=kind,
            )
        else:  # noise level 0 outside the window: the Euler step, nothing recorded [code]
            v = guided_velocity(model, x, times[k], cond, uncond, cfg_scale)
            x = euler_step(x, times[k], times[k + 1], _wide(v)).to(torch.float32)
            logp = torch.full((x.shape[0],), float("nan"), device=x.device)
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
    kind: StepKind = "sde",
) -> torch.Tensor:
    """The (B, K) log-probs of recorded transitions under ``model``'s current weights.

    states (B, K + 1, C, H, W) and times (K + 1,) as returned by ``sde_rollout``; a,
    cfg_scale, uncond and kind must be the sampler's. Differentiable when called under
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
            a=a, t_max=t_max, cfg_scale=cfg_scale, uncond=uncond, kind=kind,
        )
        out.append(logp)
    return torch.stack(out, dim=1)

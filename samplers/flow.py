"""The one flow-matching convention of the project (diffusers / SD3).

    t ∈ [0, 1],  t = 1 is noise, t = 0 is data
    x_t  = (1 − t)·x0 + t·ε            ε ~ N(0, I)
    u    = ε − x0                       velocity target
    x0̂   = x_t − t·v                    data prediction from a velocity v
    Euler step t → s (s < t):  x_s = x_t + (s − t)·v

Models see the time on SD3's 0–1000 scale (``timestep = 1000·t``). Sampling uses
SD3's shifted sigma schedule, reproduced here exactly as
``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds it (a test pins the two
together). Every other module imports these functions; none re-derives them.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time (B,) or scalar so it broadcasts over ``like`` (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, with ``t`` of shape (B,) or a scalar."""
    tb = broadcast_time(t, x0)
    return (1.0 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u = ε − x0, the conditional flow-matching target (independent of t)."""
    return noise - x0


def data_prediction(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0̂ = x_t − t·v."""
    return x_t - broadcast_time(t, x_t) * v


def euler_step(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from time t to time s < t."""
    return x_t + (broadcast_time(s, x_t) - broadcast_time(t, x_t)) * v


def to_model_timestep(t: torch.Tensor) -> torch.Tensor:
    """Map t ∈ [0, 1] to the 0–1000 scale SD3 transformers are conditioned on."""
    return t * NUM_TRAIN_TIMESTEPS


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift σ' = shift·σ / (1 + (shift − 1)·σ); shift = 1 is the identity."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sampling_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The (num_steps + 1,) decreasing float32 times of an SD3 Euler rollout, ending at 0.

    Bit for bit the numbers of ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``
    (a test pins them): the scheduler's training sigmas are float32 (1000 … 1)/1000, shifted;
    the inference grid is a float64 linspace between the largest and smallest of them on
    the 0–1000 scale, divided by 1000, shifted again in float64 and rounded to float32 once.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    train = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    train = shift_sigmas(train, shift)
    grid = torch.linspace(train[0].item() * NUM_TRAIN_TIMESTEPS, train[-1].item() * NUM_TRAIN_TIMESTEPS,
                          num_steps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    sig = shift_sigmas(grid, shift).to(torch.float32)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float32)])


def sample_training_times(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform t ∈ (0, 1) for flow-matching losses, kept off the exact end points."""
    t = torch.rand(batch, generator=generator, device=device)
    return t.clamp(1e-4, 1.0 - 1e-4)

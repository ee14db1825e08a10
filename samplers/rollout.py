"""Rollouts: the Euler ODE sampler with optional CFG and SD3's time shift."""

from __future__ import annotations

import torch

from samplers.flow import euler_step, sampling_sigmas
from samplers.policy import VelocityModel
from samplers.text import PromptEmbeddings


def guided_velocity(
    model: VelocityModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: PromptEmbeddings,
    uncond: PromptEmbeddings | None,
    cfg_scale: float,
    *,
    detach_uncond: bool = False,
) -> torch.Tensor:
    """v = v_u + s·(v_c − v_u), conditional and unconditional passes batched together.

    t: a scalar tensor or (B,) per-sample times. ``detach_uncond`` stops the gradient through
    v_u (Flow-GRPO's learner, ``scripts/train_sd3.py`` @ ac4c86e L190 [code]); the value is
    the same either way."""
    tb = t.reshape(()).expand(x_t.shape[0]) if t.numel() == 1 else t
    if cfg_scale == 1.0 or uncond is None:
        return model(x_t, tb, cond)
    both = PromptEmbeddings(torch.cat([uncond.tokens, cond.tokens]), torch.cat([uncond.pooled, cond.pooled]))
    v_u, v_c = model(torch.cat([x_t, x_t]), torch.cat([tb, tb]), both).chunk(2)
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def euler_rollout(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: PromptEmbeddings,
    *,
    num_steps: int,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    uncond: PromptEmbeddings | None = None,
    keep_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with Euler steps.

    noise: (B, C, H, W); cond / uncond: embeddings of B prompts (uncond is needed
    when cfg_scale ≠ 1). Returns (states, times): states (B, K + 1, C, H, W) with
    states[:, 0] = noise and states[:, K] the sample (only (B, 1, C, H, W), the
    sample, when keep_states is False); times (K + 1,) from 1 to 0.
    """
    if cfg_scale != 1.0 and uncond is None:
        raise ValueError("cfg_scale != 1 needs the unconditional embeddings (uncond)")
    times = sampling_sigmas(num_steps, shift).to(noise.device)
    x = noise
    states = [x] if keep_states else []
    for k in range(num_steps):
        v = guided_velocity(model, x, times[k], cond, uncond, cfg_scale)
        x = euler_step(x, times[k], times[k + 1], v)
        if keep_states:
            states.append(x)
    out = torch.stack(states, dim=1) if keep_states else x.unsqueeze(1)
    return out, times

"""AC-Flow's critic V_φ(x_t, t, c): a small value network over intermediate states.

[reconstructed] The AC-Flow abstract asks for "a computationally efficient critic"; the
paper's architecture was not available. This one is two convolutions over the state pooled
to a 4×4 grid, a sinusoidal time embedding and a projection of the pooled prompt
embedding, joined by a two-layer head: ≈41 k parameters for the digits world (6.5% of
the policy), and it works unchanged on SD3 latents (16 channels, any size) because the
pooling is adaptive.

``norm="layer"`` puts a LayerNorm after each hidden Linear of the MLP parts (the pooled
features, the time embedding, the head), before its GELU; ``"none"`` builds the same modules
(and state-dict keys) as before the option existed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

CriticNorm = Literal["none", "layer"]
CRITIC_NORMS: tuple[str, ...] = ("none", "layer")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t ∈ [0, 1] (scaled to 0–1000 like the policy): (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ValueCritic(nn.Module):
    """V_φ(x_t, t, c) → (B,): the expected shaped reward of the final sample given x_t."""

    def __init__(self, in_channels: int, cond_dim: int, width: int = 32, time_dim: int = 32,
                 norm: CriticNorm = "none") -> None:
        super().__init__()
        if norm not in CRITIC_NORMS:
            raise ValueError(f"unknown critic norm {norm!r}; valid: {', '.join(CRITIC_NORMS)}")
        self.time_dim = time_dim

        def act(dim: int) -> list[nn.Module]:  # [LayerNorm,] GELU after a hidden Linear
            return [nn.LayerNorm(dim), nn.GELU()] if norm == "layer" else [nn.GELU()]

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
            # a coarse 4×4 grid, not a global mean: where the strokes are is what a digit is;
            # adaptive pooling keeps the critic size-independent for SD3 latents
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, width), *act(width),
        )
        self.time = nn.Sequential(nn.Linear(time_dim, width), *act(width))
        self.cond = nn.Linear(cond_dim, width)
        self.head = nn.Sequential(nn.Linear(3 * width, 2 * width), *act(2 * width), nn.Linear(2 * width, 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        h = torch.cat([self.features(x_t), self.time(timestep_embedding(t, self.time_dim)),
                       self.cond(pooled.to(x_t.dtype))], dim=1)
        return self.head(h).squeeze(1)

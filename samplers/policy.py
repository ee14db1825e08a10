"""Velocity models: the policy interface shared by samplers and the learner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from samplers.flow import to_model_timestep
from samplers.text import PromptEmbeddings


class VelocityModel(Protocol):
    """v_θ(x_t, t, c): x_t (B, C, H, W), t (B,) in [0, 1] (1 = noise) → (B, C, H, W)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor: ...


class SD3Velocity(nn.Module):
    """Wraps a diffusers ``SD3Transformer2DModel`` in the project's convention.

    The transformer predicts u = ε − x0 given the 0–1000 timestep; this module takes
    t ∈ [0, 1] and prompt embeddings, so every caller speaks one convention.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=cond.tokens.to(x_t.dtype),
            pooled_projections=cond.pooled.to(x_t.dtype),
            timestep=to_model_timestep(t),
            return_dict=False,
        )[0]


def build_sd3_velocity(config: dict[str, Any]) -> SD3Velocity:
    """An ``SD3Velocity`` around a freshly initialised transformer of this config."""
    from diffusers import SD3Transformer2DModel

    return SD3Velocity(SD3Transformer2DModel(**config))


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (order independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():  # hashed in place: a bytes copy would cost 4× the hash itself
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_velocity(model: SD3Velocity, path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """Write the transformer's weights and config to one safetensors file (config in metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"transformer_config": json.dumps(dict(model.transformer.config)), **(metadata or {})}
    state = {k: v.detach().contiguous() for k, v in model.transformer.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


def load_velocity(path: Path | str) -> SD3Velocity:
    """Rebuild an ``SD3Velocity`` from a file written by ``save_velocity``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    if "transformer_config" not in meta:
        raise ValueError(f"{path} has no transformer_config metadata; not an fmrl policy checkpoint")
    config = {k: v for k, v in json.loads(meta["transformer_config"]).items() if not k.startswith("_")}
    model = build_sd3_velocity(config)
    missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model

"""Small real models for tests: a tiny SD3 transformer and a fixed prompt table."""

import torch

from samplers.policy import SD3Velocity, build_sd3_velocity
from samplers.text import PromptEmbeddings
from samplers.trajectory import Trajectory

TINY_CONFIG = {
    "sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 1, "num_layers": 1,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
    "caption_projection_dim": 16, "pooled_projection_dim": 12, "pos_embed_max_size": 4,
}


def tiny_velocity(seed: int = 0) -> SD3Velocity:
    torch.manual_seed(seed)
    return build_sd3_velocity(dict(TINY_CONFIG))


def table_encode(prompts: list[str]) -> PromptEmbeddings:
    """Deterministic embeddings per prompt string (a stand-in table, not a text model)."""
    rows_t, rows_p = [], []
    for p in prompts:
        g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
        rows_t.append(torch.randn(3, 12, generator=g))
        rows_p.append(torch.randn(12, generator=g))
    return PromptEmbeddings(torch.stack(rows_t), torch.stack(rows_p))


def fake_batch(b: int = 8, seed: int = 0, version: int = 0) -> Trajectory:
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, 1, 8, 8, generator=g)
    x0 = torch.randn(b, 1, 8, 8, generator=g).clamp(-1, 1)
    return Trajectory(
        noise=noise, states=torch.stack([noise, x0], 1), times=torch.tensor([1.0, 0.0]),
        images=np.zeros((b, 8, 8, 1), np.uint8), prompt_ids=torch.arange(b) % 2,
        prompts=("a handwritten one", "a handwritten two"), version=version, cfg_scale=1.0,
    )

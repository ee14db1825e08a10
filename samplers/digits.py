"""The digits world's policy: a small SD3 transformer in 8×8 pixel space.

Pixels live in [−1, 1] (x = 2·p/255 − 1). The model is diffusers'
``SD3Transformer2DModel``, the class SD3 uses, conditioned on MiniLM prompt embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {word}",
    "a picture of the number {word}",
    "{numeral}, written by hand",
)
UNCONDITIONAL_PROMPT = ""
ASSETS = Path(__file__).resolve().parent / "assets"
POLICY_FILE = ASSETS / "digits_policy.safetensors"
IMAGE_SHAPE = (1, 8, 8)

#: The shipped model: 16 patches of 2×2 pixels, 4 joint-attention blocks of width 64 (0.63 M parameters).
DIGITS_TRANSFORMER_CONFIG: dict[str, object] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 384,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 384,
    "pos_embed_max_size": 4,
}


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt asking for ``digit`` in template ``template``."""
    return TEMPLATES[template].format(word=DIGIT_WORDS[digit], numeral=str(digit))


def default_prompts() -> list[str]:
    """One prompt per digit in the first template: "a handwritten zero" … "a handwritten nine"."""
    return [prompt_for(d) for d in range(10)]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 8, 8) → float32 (N, 1, 8, 8) in [−1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space (N, C, H, W) in [−1, 1] → uint8 images (N, H, W, C), clamped."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()

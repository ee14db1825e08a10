"""The reward contract every reward model follows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class RewardOutput:
    """What a reward returns for N images.

    scores: (N,) float64, one reward per image.
    details: named (N,) arrays of per-image extras (e.g. the predicted class).
    """

    scores: np.ndarray
    details: dict[str, np.ndarray] = field(default_factory=dict)


class Reward(Protocol):
    """A reward model: ``images`` uint8 (N, H, W, C), N prompts and, when the prompts come from a
    dataset that has it, each prompt's metadata (N JSON dicts; None otherwise) → RewardOutput.
    The built-in rewards ignore the metadata; a user's (kind python) may read it."""

    name: str

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput: ...


def check_batch(images: np.ndarray, prompts: list[str], channels: int | None = None) -> None:
    """Reject a malformed batch with a message that names the problem."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got {type(images).__name__} "
                         f"{getattr(images, 'dtype', '')}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(f"expected {channels} channel(s), got images of shape {images.shape}")

"""Example user rewards for ``kind: python`` (docs/rewards.md): the callable contract, runnable.

``reward_workers.examples:stroke_contrast`` is a function; ``reward_workers.examples:TargetInk``
a class built once with ``init_kwargs`` that reads each prompt's metadata. Both score any uint8
(N, H, W, C) images, the digits world's 8×8 ones included.
"""

from __future__ import annotations

import numpy as np


def stroke_contrast(images: np.ndarray, prompts: list[str], metadata: list[dict] | None):
    """Crisp strokes: mean absolute difference of neighbouring pixels, in [0, 1] per image;
    returns the scores and one named component, the ink (mean brightness)."""
    x = images.astype(np.float64) / 255.0                     # (N, H, W, C) in [0, 1]
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))      # left-right changes
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))      # up-down changes
    return (dx + dy) / 2, {"ink": x.mean(axis=(1, 2, 3))}


class TargetInk:
    """−|ink − target|: the target from a prompt's metadata ``{"ink": 0.3}`` when it has one,
    else ``default`` (an init kwarg)."""

    def __init__(self, default: float = 0.25) -> None:
        self.default = float(default)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None) -> np.ndarray:
        ink = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
        target = np.array([float((m or {}).get("ink", self.default)) for m in (metadata or [None] * len(prompts))])
        return -np.abs(ink - target)

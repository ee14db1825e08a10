"""Rewards computed from the pixels alone: JPEG (in)compressibility and closeness to a target image."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reward_workers.base import RewardOutput, check_batch

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


def _pil_image(image: np.ndarray) -> PILImage:
    """(H, W, 1) or (H, W, 3) uint8 → a Pillow image in mode L or RGB."""
    from PIL import Image

    if image.shape[-1] == 1:
        return Image.fromarray(image[..., 0])
    if image.shape[-1] == 3:
        return Image.fromarray(image)
    raise ValueError(f"JPEG rewards take 1 or 3 channels, got an image of shape {image.shape}")


def jpeg_bytes(image: np.ndarray, quality: int) -> int:
    """The size in bytes of ``image`` (H, W, 1|3) uint8 JPEG-encoded by Pillow at ``quality``."""
    buffer = io.BytesIO()
    _pil_image(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


class JpegCompressibility:
    """Reward = sign · (JPEG size in kB), 1 kB = 1000 bytes, encoded by Pillow at ``quality``.

    DDPO (Black et al. 2023): sign −1 rewards compressible images ("jpeg_compressibility"),
    sign +1 incompressible ones ("jpeg_incompressibility"). ``details["jpeg_kb"]`` is the
    unsigned size.
    """

    def __init__(self, quality: int = 95, sign: int = -1) -> None:
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 (compressibility) or +1 (incompressibility), got {sign}")
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality, self.sign = quality, sign
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        kb = np.array([jpeg_bytes(im, self.quality) / 1000.0 for im in images], dtype=np.float64)
        return RewardOutput(scores=self.sign * kb, details={"jpeg_kb": kb})


def load_target(target: str | Path | np.ndarray) -> np.ndarray:
    """A target image as (H, W, C) uint8 from a .npy or .png file or an array; (H, W) gains C = 1."""
    if isinstance(target, np.ndarray):
        image = target
    else:
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"target image not found: {path}")
        if path.suffix == ".npy":
            image = np.load(path, allow_pickle=False)
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                if im.mode not in ("L", "RGB"):
                    raise ValueError(f"target image {path} has mode {im.mode}; expected L or RGB")
                image = np.asarray(im)
        else:
            raise ValueError(f"target image must be a .npy or .png file, got {path}")
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"target image must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
    return image[..., None] if image.ndim == 2 else image


class TargetImageReward:
    """Reward = −mean((x − target)²) over pixels and channels, x and target in [0, 1].

    0 for the target itself, −1 for its photographic negative on a black/white target.
    The prompt is not used.
    """

    name = "target_image"

    def __init__(self, target: str | Path | np.ndarray) -> None:
        self.target = load_target(target).astype(np.float64) / 255.0

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        if images.shape[1:] != self.target.shape:
            raise ValueError(f"images of shape {images.shape} do not match the target image of shape "
                             f"{self.target.shape}")
        diff = images.astype(np.float64) / 255.0 - self.target
        return RewardOutput(scores=-(diff**2).mean(axis=(1, 2, 3)))

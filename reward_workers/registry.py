"""One explicit table from a reward's kind (config, `fmrl reward-worker --reward`) to its builder.

The kind ``python`` is the open end of the table: a user's callable (reward_workers/custom.py),
built by :func:`build_python_reward` from its ``package.module:function`` and init kwargs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reward_workers.base import Reward

ASSETS = Path(__file__).resolve().parent / "assets"
DIGITS_CLIP_DIR = ASSETS / "digits_clip"
AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"


def _required(kind: str, model_path: str | Path | None, what: str) -> Path:
    if model_path is None:
        raise ValueError(f"reward {kind!r} has no shipped model; set model_path to {what}")
    return Path(model_path)


def _no_model(kind: str, model_path: str | Path | None) -> None:
    if model_path is not None:
        raise ValueError(f"reward {kind!r} takes no model_path, got {model_path}")


def _digits_classifier(model_path: str | Path | None) -> Reward:
    from reward_workers.digits import CLASSIFIER_FILE, DigitsClassifierReward

    return DigitsClassifierReward(model_path or CLASSIFIER_FILE)


def _compose(model_path: str | Path | None) -> Reward:
    from reward_workers.compose import ComposeReward
    from reward_workers.digits import CLASSIFIER_FILE

    return ComposeReward(model_path or CLASSIFIER_FILE)


def _clip(model_path: str | Path | None) -> Reward:
    from reward_workers.clip import CLIPScoreReward

    return CLIPScoreReward(model_path or DIGITS_CLIP_DIR)


def _pickscore(model_path: str | Path | None) -> Reward:
    from reward_workers.clip import PreferenceReward

    return PreferenceReward(model_path or DIGITS_CLIP_DIR)


def _aesthetic(model_path: str | Path | None) -> Reward:
    from reward_workers.aesthetic import AestheticReward

    directory = _required("aesthetic", model_path,
                          f"a directory holding a CLIP model and {AESTHETIC_HEAD_FILE}")
    return AestheticReward(directory, directory / AESTHETIC_HEAD_FILE)


def _jpeg_compressibility(model_path: str | Path | None) -> Reward:
    from reward_workers.image_rewards import JpegCompressibility

    _no_model("jpeg_compressibility", model_path)
    return JpegCompressibility(sign=-1)


def _jpeg_incompressibility(model_path: str | Path | None) -> Reward:
    from reward_workers.image_rewards import JpegCompressibility

    _no_model("jpeg_incompressibility", model_path)
    return JpegCompressibility(sign=1)


def _target_image(model_path: str | Path | None) -> Reward:
    from reward_workers.image_rewards import TargetImageReward

    return TargetImageReward(_required("target_image", model_path, "the target image (.npy or .png)"))


REWARDS: dict[str, Callable[[str | Path | None], Reward]] = {
    "digits_classifier": _digits_classifier,
    "compose": _compose,
    "clip": _clip,
    "pickscore": _pickscore,
    "aesthetic": _aesthetic,
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
    "target_image": _target_image,
}


PYTHON = "python"
KINDS = (*REWARDS, PYTHON)
"""Every kind a component or a service may name."""


def build_reward(kind: str, model_path: str | Path | None = None) -> Reward:
    """The reward of ``kind`` loaded from ``model_path`` (its default when None)."""
    if kind == PYTHON:
        raise ValueError("reward 'python' needs a callable: build it with build_python_reward")
    try:
        builder = REWARDS[kind]
    except KeyError:
        raise ValueError(f"unknown reward {kind!r}; valid: {', '.join(sorted(KINDS))}") from None
    return builder(model_path)


def python_wire_name(spec: str) -> str:
    """The reward name a python reward's requests carry over Redis: ``python:<callable>``, so its
    stream is its own and a service running another callable refuses them (``wrong_reward``)."""
    return f"{PYTHON}:{spec}"


def build_python_reward(spec: str, init_kwargs: Mapping[str, Any] | None = None,
                        name: str | None = None) -> Reward:
    """The user's reward ``package.module:function`` (or class, built with ``init_kwargs``);
    ValueError in one line when it cannot be imported or has the wrong signature."""
    from reward_workers.custom import PythonReward

    return PythonReward(spec, init_kwargs, name=name)

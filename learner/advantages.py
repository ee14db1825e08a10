"""Reward normalisation and advantage shaping, shared by every objective.

Two reward trackers (``tracker.mode`` in the config):

- ``PerPromptStatTracker`` (``buffer``): per-prompt running mean/std over a bounded
  buffer, falling back to batch statistics below a minimum count, as in DDPO (Black et
  al., 2023, ``PerPromptStatTracker``) [code]. Its ``global_std`` option divides the
  prompt-centred rewards by the std of all of the batch's prompt-centred rewards, the
  advantage of AdvantageFlow [restated].
- ``BatchStatTracker`` (``batch``): the released tracker of Flow-GRPO and DiffusionNFT
  (``flow_grpo/stat_tracking.py``, cleared every epoch): statistics of the current batch
  only; ``global_std`` divides by the std of the batch's *raw* rewards [code].
- ``shape_rewards``: AC-Flow's squash of normalised rewards into [−limit, limit] by
  clamp or tanh [reconstructed: the paper's exact shaping was not available].
- ``clip_advantages``: advantage clipping to [−A_max, A_max] (AC-Flow's dual-stability
  clipping [reconstructed]; Flow-GRPO and DiffusionNFT clip to ±5 [paper][code]).
- ``group_centred``: reward minus its prompt group's batch mean, the numerator of
  GRPO-style advantages.

Pure tensor code: no Ray, Redis, diffusers, pydantic or project imports. Statistics
are population statistics (``correction=0``, numpy's default ``ddof=0``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import torch

ShapeMode = Literal["none", "clip", "tanh"]
TrackerMode = Literal["buffer", "batch"]


class PerPromptStatTracker:
    """Per-prompt running reward statistics (DDPO's), for exact resume.

    (Flow-GRPO's and DiffusionNFT's releases clear theirs every epoch: ``BatchStatTracker``.)

    Each prompt keeps a buffer (a deque) of its ``buffer_size`` most recent rewards.
    ``normalize`` first appends the batch's rewards to their prompts' buffers, then
    computes for every sample

        A_i = (r_i − μ_c) / (σ_c + eps)

    where μ_c, σ_c are the mean and population std of prompt c's buffer when it holds
    at least ``min_count`` values, else of the whole current batch (the fallback).
    With ``global_std`` the denominator is instead σ_g + eps, σ_g the population std
    over the batch of the centred rewards r_i − μ_c [restated, AdvantageFlow].
    """

    def __init__(
        self,
        buffer_size: int = 32,
        min_count: int = 16,
        global_std: bool = False,
        eps: float = 1e-6,
    ) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        if min_count > buffer_size:
            # A buffer never holds more than buffer_size values, so per-prompt
            # statistics would never be used.
            raise ValueError(f"min_count ({min_count}) must not exceed buffer_size ({buffer_size})")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.global_std = global_std
        self.eps = eps
        self._buffers: dict[str, deque[float]] = {}

    def normalize(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Update the buffers with this batch and return its normalised rewards.

        prompts: B prompt strings (the group key); rewards: (B,) finite rewards.
        Returns advantages (B,) float32 on ``rewards``' device and statistics:
        ``zero_spread_groups`` (prompts whose rewards in this batch are all equal,
        a single sample included: they carry no within-group signal),
        ``fallback_fraction`` (fraction of samples normalised with batch statistics)
        and ``groups`` (distinct prompts in the batch).
        Raises ValueError, leaving the buffers untouched, on a length mismatch, an
        empty batch or non-finite rewards.
        """
        n = rewards.numel()
        r, groups = _checked(prompts, rewards)
        values = r.tolist()
        for p, idx in groups.items():
            buf = self._buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(values[i] for i in idx)

        mean = torch.full((n,), float(r.mean()), dtype=torch.float64)
        std = torch.full((n,), float(r.std(correction=0)), dtype=torch.float64)
        fallback = n
        zero_spread = 0
        for p, idx in groups.items():
            buf = self._buffers[p]
            if len(buf) >= self.min_count:
                b = torch.tensor(list(buf), dtype=torch.float64)
                mean[idx] = b.mean()
                std[idx] = b.std(correction=0)
                fallback -= len(idx)
            if len({values[i] for i in idx}) == 1:
                zero_spread += 1

        centred = r - mean
        if self.global_std:
            std = centred.std(correction=0).expand(n)
        advantages = (centred / (std + self.eps)).to(device=rewards.device, dtype=torch.float32)
        stats = {
            "zero_spread_groups": float(zero_spread),
            "fallback_fraction": fallback / n,
            "groups": float(len(groups)),
        }
        return advantages, stats

    def state_dict(self) -> dict[str, Any]:
        """Settings and buffers as plain JSON-serialisable Python values."""
        return {
            "mode": "buffer",
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "global_std": self.global_std,
            "eps": self.eps,
            "buffers": {p: list(buf) for p, buf in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the buffers saved by ``state_dict``.

        The saved settings must equal this tracker's: resuming under other settings
        would silently change the advantages, so it is an error (so is a batch tracker's state;
        a state without ``mode`` predates the batch tracker and is a buffer tracker's).
        """
        if state.get("mode", "buffer") != "buffer":
            raise ValueError(f"state was saved by a {state.get('mode')!r} tracker, this one is a 'buffer' tracker")
        saved = {k: state[k] for k in ("buffer_size", "min_count", "global_std", "eps")}
        mine = {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "global_std": self.global_std, "eps": self.eps}
        if saved != mine:
            raise ValueError(f"state was saved with settings {saved}, this tracker has {mine}")
        self._buffers = {
            str(p): deque((float(v) for v in vals), maxlen=self.buffer_size)
            for p, vals in state["buffers"].items()
        }


def _checked(prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """The rewards as float64 on the CPU and each prompt's indices, in first-seen order;
    ValueError on a length mismatch, an empty batch or non-finite rewards."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} rewards")
    if n == 0:
        raise ValueError("empty batch: no rewards to normalise")
    r = rewards.detach().to("cpu", torch.float64)
    bad = int((~torch.isfinite(r)).sum())
    if bad:
        raise ValueError(f"{bad} of {n} rewards are not finite")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return r, groups


class BatchStatTracker:
    """The released per-prompt tracker of Flow-GRPO and DiffusionNFT: this batch only.

    ``flow_grpo/stat_tracking.py`` (``PerPromptStatTracker.update``, identical in both
    releases) is cleared after every epoch's single update, so its statistics are those of
    the current batch [code]. For every sample of prompt c

        A_i = (r_i − μ_c) / (σ + eps),   eps = 1e-4

    with μ_c the mean of c's rewards in this batch and σ the population std of *all* the
    batch's raw rewards with ``global_std``, else of c's rewards in this batch. A prompt
    with a single sample gets A = 0 (r_i = μ_c; σ_c = 0 divides nothing). When *every*
    prompt has a single sample the released training scripts skip the tracker and use
    (r − mean)/(std + 1e-4) over the whole batch (Flow-GRPO's ``train_sd3.py``; DiffusionNFT's
    asserts instead), which this tracker does too. It keeps no state between batches.
    """

    def __init__(self, global_std: bool = True, eps: float = 1e-4) -> None:
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.global_std = global_std
        self.eps = eps

    def normalize(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """This batch's advantages. prompts: B strings (the group key); rewards: (B,) finite.

        Returns advantages (B,) on ``rewards``' device and in its dtype (computed in float64)
        and statistics ``zero_spread_groups`` (prompts whose rewards in this batch are all
        equal, a single sample included) and ``groups`` (distinct prompts). ValueError on a length mismatch,
        an empty batch or non-finite rewards.
        """
        r, groups = _checked(prompts, rewards)
        n = r.numel()
        if len(groups) == n:  # all singletons: the scripts' whole-batch normalisation
            adv = (r - r.mean()) / (r.std(correction=0) + self.eps)
        else:
            adv = torch.empty_like(r)
            batch_std = r.std(correction=0)
            for idx in groups.values():
                g = r[idx]
                std = batch_std if self.global_std else g.std(correction=0)
                adv[idx] = (g - g.mean()) / (std + self.eps)
        zero_spread = sum(1 for idx in groups.values() if bool((r[idx] == r[idx[0]]).all()))
        stats = {"zero_spread_groups": float(zero_spread), "groups": float(len(groups))}
        dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
        return adv.to(device=rewards.device, dtype=dtype), stats

    def state_dict(self) -> dict[str, Any]:
        """Only the settings: the tracker forgets every batch."""
        return {"mode": "batch", "global_std": self.global_std, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that ``state`` was saved by a batch tracker with these settings (else ValueError)."""
        saved = {"mode": state.get("mode", "buffer"), "global_std": state.get("global_std"), "eps": state.get("eps")}
        if saved != self.state_dict():
            raise ValueError(f"state was saved with settings {saved}, this tracker has {self.state_dict()}")


RewardTracker = PerPromptStatTracker | BatchStatTracker


def make_tracker(mode: TrackerMode, buffer_size: int = 32, min_count: int = 16,
                 global_std: bool = False) -> RewardTracker:
    """The tracker of ``mode``: ``buffer`` (running per-prompt buffers, buffer_size and
    min_count apply) or ``batch`` (the released Flow-GRPO/DiffusionNFT tracker)."""
    if mode == "batch":
        return BatchStatTracker(global_std=global_std)
    if mode == "buffer":
        return PerPromptStatTracker(buffer_size=buffer_size, min_count=min_count, global_std=global_std)
    raise ValueError(f"unknown tracker mode {mode!r}; valid modes: ['batch', 'buffer']")


def _shape_none(a: torch.Tensor, limit: float) -> torch.Tensor:
    return a


def _shape_clip(a: torch.Tensor, limit: float) -> torch.Tensor:
    return a.clamp(-limit, limit)


def _shape_tanh(a: torch.Tensor, limit: float) -> torch.Tensor:
    return limit * torch.tanh(a / limit)


_SHAPERS = {"none": _shape_none, "clip": _shape_clip, "tanh": _shape_tanh}


def shape_rewards(advantages: torch.Tensor, mode: ShapeMode, limit: float = 1.0) -> torch.Tensor:
    """AC-Flow's reward shaping [reconstructed]: squash normalised rewards into [−limit, limit].

    ``"clip"``: clamp(a, −limit, limit); ``"tanh"``: limit·tanh(a/limit), smooth and
    of unit slope at 0; ``"none"``: identity. advantages (...) → same shape.
    """
    if mode not in _SHAPERS:
        raise ValueError(f"unknown shaping mode {mode!r}; valid modes: {sorted(_SHAPERS)}")
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return _SHAPERS[mode](advantages, limit)


def clip_advantages(advantages: torch.Tensor, a_max: float) -> tuple[torch.Tensor, float]:
    """Clamp advantages to [−a_max, a_max] (AC-Flow [reconstructed]; Flow-GRPO ±5).

    advantages (...) → same shape, and the fraction of entries strictly beyond the
    bound (0.0 for an empty tensor), a metric of how often the clip binds.
    """
    if a_max <= 0:
        raise ValueError(f"a_max must be positive, got {a_max}")
    n = advantages.numel()
    fraction = float((advantages.abs() > a_max).sum()) / n if n else 0.0
    return advantages.clamp(-a_max, a_max), fraction


def group_centred(prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """r_i − mean{r_j : prompt_ids_j = prompt_ids_i} within this batch (GRPO numerator).

    prompt_ids: (B,) integer group keys, any values; rewards: (B,) float → (B,).
    """
    if prompt_ids.dim() != 1 or prompt_ids.shape != rewards.shape:
        raise ValueError(
            f"prompt_ids and rewards must both be (B,), got {tuple(prompt_ids.shape)} and {tuple(rewards.shape)}"
        )
    keys, inverse = torch.unique(prompt_ids, return_inverse=True)
    g = keys.numel()
    sums = torch.zeros(g, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    counts = torch.bincount(inverse, minlength=g).to(rewards.dtype)
    return rewards - (sums / counts)[inverse]

"""Supervised flow-matching pretraining with prompt dropout (so that CFG works)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from learner.settings import EmaSchedule
from samplers.flow import interpolate, sample_training_times, velocity_target
from samplers.policy import SD3Velocity
from samplers.text import PromptEmbeddings


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    prompt_dropout: float = 0.1
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target ← decay·target + (1 − decay)·source, parameter by parameter (the trainable ones:
    a frozen parameter, such as an adapted policy's base, is the same in both)."""
    for pt, ps in zip(target.parameters(), source.parameters(), strict=True):
        if ps.requires_grad:
            pt.lerp_(ps, 1.0 - decay)


# DiffusionNFT's ``return_decay`` (scripts/train_nft_sd3.py:169–189): decay_type → (flat, uprate, uphold)
_NFT_DECAY = {"nft_decay0": (0, 0.0, 0.0), "nft_decay1": (0, 0.001, 0.5), "nft_decay2": (75, 0.0075, 0.999)}


def rollout_ema_decay(schedule: EmaSchedule, step: int, constant: float) -> float:
    """The decay d of π_old ← d·π_old + (1 − d)·π_θ after optimiser step ``step`` (1-based).

    ``constant``: d = ``constant`` (the learner's rollout_ema_decay). The release's
    ``return_decay`` [code] (scripts/train_nft_sd3.py:169–189, applied once per epoch at
    1034–1039 with the number of optimiser steps so far): d = 0 for step < flat, else
    min((step − flat)·rate, cap) with (flat, rate, cap) = ``nft_decay0``: (0, 0, 0) (a copy),
    ``nft_decay1``: (0, 0.001, 0.5) (config/nft.py:60, the default), ``nft_decay2``:
    (75, 0.0075, 0.999) (config/nft.py:78, OCR).
    """
    if schedule == "constant":
        return constant
    if schedule not in _NFT_DECAY:
        raise ValueError(f"unknown EMA schedule {schedule!r}; valid: constant, {', '.join(sorted(_NFT_DECAY))}")
    flat, rate, cap = _NFT_DECAY[schedule]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def pretrain_flow_matching(
    model: SD3Velocity,
    data: torch.Tensor,
    cond: PromptEmbeddings,
    uncond: PromptEmbeddings,
    settings: PretrainSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> SD3Velocity:
    """Fit v_θ to u = ε − x0 on (data, cond) pairs; returns the EMA of the weights.

    data: (N, C, H, W) in model space; cond: embeddings of each example's prompt (N rows);
    uncond: the empty prompt's embedding (1 row), used in place of ``cond`` with
    probability ``prompt_dropout``.
    """
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    n = data.shape[0]
    for step in range(settings.steps):
        idx = torch.randint(0, n, (settings.batch_size,), generator=g)
        x0 = data[idx]
        c = cond.index(idx)
        drop = torch.rand(settings.batch_size, generator=g) < settings.prompt_dropout
        tokens = torch.where(drop[:, None, None], uncond.tokens.expand_as(c.tokens), c.tokens)
        pooled = torch.where(drop[:, None], uncond.pooled.expand_as(c.pooled), c.pooled)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_training_times(settings.batch_size, g)
        v = model(interpolate(x0, noise, t), t, PromptEmbeddings(tokens, pooled))
        loss = (v - velocity_target(x0, noise)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, model, settings.ema_decay if step >= settings.warmup_steps else 0.0)
        if on_step is not None:
            on_step(step, loss.item())
    return ema.eval()

"""The learner: a trained policy, a frozen reference, a lagged rollout policy, AdamW.

The rollout policy π_old is a frozen copy of π_θ refreshed every
``rollout_refresh_every`` optimiser steps (ORW-CFM-W2's "steps per epoch" H); its
weights are what samplers roll out, so each refresh is a new published version.
The learner owns reduction and accumulation: objectives return per-sample losses,
the learner sums them over micro-batches and divides by the batch size, so the
gradient does not depend on how the batch is cut.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from learner.coupling import Coupling, couple
from learner.objectives import orw_cfm_w2_loss
from samplers.flow import interpolate, sample_training_times, velocity_target
from samplers.policy import SD3Velocity, load_velocity, save_velocity, state_checksum
from samplers.text import PromptEmbeddings
from samplers.trajectory import Trajectory

ObjectiveName = Literal["orw_cfm_w2"]


@dataclass(frozen=True)
class LearnerSettings:
    """Optimisation and objective settings (the services config maps onto these).

    The defaults are the ORW-CFM-W2 released code's (τ = 0.5, α = 1, raw weights); the
    digits world's config chooses its own (docs/algorithms.md says why).
    """

    objective: ObjectiveName = "orw_cfm_w2"
    tau: float = 0.5
    alpha: float = 1.0
    normalize_weights: bool = False
    coupling: Coupling = "independent"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 10
    micro_batch_size: int = 64
    updates_per_batch: int = 1
    rollout_refresh_every: int = 1
    seed: int = 0


@dataclass(frozen=True)
class WeightsPayload:
    """One published policy: versioned weights and their checksum."""

    version: int
    state: dict[str, torch.Tensor]
    checksum: str


Encode = Callable[[list[str]], PromptEmbeddings]


class Learner:
    """Turns scored trajectories into updates of π_θ and publishes π_old."""

    def __init__(self, policy: SD3Velocity, encode: Encode, settings: LearnerSettings) -> None:
        if settings.objective != "orw_cfm_w2":
            raise ValueError(f"unknown objective {settings.objective!r}; valid: 'orw_cfm_w2'")
        self.settings = settings
        self.encode = encode
        self.policy = policy.train()
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.rollout = copy.deepcopy(policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        warm = max(1, settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.version = 0

    # ---- updates -------------------------------------------------------------------
    def update(self, batch: Trajectory, rewards: torch.Tensor) -> dict[str, float]:
        """``updates_per_batch`` optimiser steps on one scored batch; returns mean statistics.

        rewards: (B,) one reward per rollout of ``batch``. Raises on a NaN/inf reward
        rather than train on it.
        """
        rewards = rewards.to(torch.float32)
        if rewards.shape != (batch.size,):
            raise ValueError(f"expected {batch.size} rewards, got shape {tuple(rewards.shape)}")
        if not torch.isfinite(rewards).all():
            raise ValueError(f"{int((~torch.isfinite(rewards)).sum())} non-finite rewards in the batch")
        cond = self.encode(list(batch.prompts)).index(batch.prompt_ids)
        totals: dict[str, float] = {}
        for _ in range(self.settings.updates_per_batch):
            for k, v in self._optimizer_step(batch.samples, batch.prompt_ids, cond, rewards).items():
                totals[k] = totals.get(k, 0.0) + v / self.settings.updates_per_batch
        totals["rollout_version"] = float(batch.version)
        return totals

    def _optimizer_step(
        self, x0: torch.Tensor, groups: torch.Tensor, cond: PromptEmbeddings, rewards: torch.Tensor
    ) -> dict[str, float]:
        s = self.settings
        b = x0.shape[0]
        # all randomness is drawn for the whole batch first, so micro-batching changes nothing
        t = sample_training_times(b, self.generator)
        noise = couple(x0, torch.randn(x0.shape, generator=self.generator), groups, s.coupling)
        x_t = interpolate(x0, noise, t)
        u = velocity_target(x0, noise)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        loss_sum = 0.0
        # the batch-normalised option divides by the whole batch's mean weight
        norm = torch.exp(s.tau * rewards).mean() if s.normalize_weights else None
        for lo in range(0, b, s.micro_batch_size):
            sl = slice(lo, lo + s.micro_batch_size)
            c = PromptEmbeddings(cond.tokens[sl], cond.pooled[sl])
            v_theta = self.policy(x_t[sl], t[sl], c)
            with torch.no_grad():
                v_ref = self.reference(x_t[sl], t[sl], c) if s.alpha > 0 else v_theta.detach()
            losses, stats = orw_cfm_w2_loss(
                v_theta, u[sl], v_ref, rewards[sl], tau=s.tau, alpha=s.alpha, weight_normalizer=norm
            )
            (losses.sum() / b).backward()
            loss_sum += float(losses.detach().sum())
            n = losses.shape[0]
            for k, v in stats.items():
                if k in ("fm", "w2"):
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        grad_norm = float(nn.utils.clip_grad_norm_(self.policy.parameters(), s.grad_clip))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm at learner step {self.step}")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.step % s.rollout_refresh_every == 0:
            self.refresh_rollout()
        w = torch.exp(s.tau * rewards)
        return {
            "loss": loss_sum / b,
            "fm": sums["fm"] / b,
            "w2": sums["w2"] / b,
            "grad_norm": grad_norm,
            "ess": float(w.sum() ** 2 / (b * w.pow(2).sum())),
            "lr": self.scheduler.get_last_lr()[0],
        }

    # ---- publishing ----------------------------------------------------------------
    def refresh_rollout(self) -> None:
        """π_old ← π_θ; the copy becomes the next published version."""
        self.rollout.load_state_dict(self.policy.state_dict())
        self.version = self.step

    def publish(self, current: bool = False) -> WeightsPayload:
        """The rollout policy's weights (or π_θ's when ``current``), with version and checksum."""
        src = self.policy if current else self.rollout
        state = {k: v.detach().clone() for k, v in src.state_dict().items()}
        return WeightsPayload(self.step if current else self.version, state, state_checksum(state))

    # ---- checkpoints ---------------------------------------------------------------
    def save(self, directory: Path | str) -> Path:
        """policy.safetensors (loadable by ``fmrl sample``) and optimizer.safetensors."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(self.step), "version": str(self.version),
                "settings": json.dumps(asdict(self.settings))}
        save_velocity(self.policy, d / "policy.safetensors", metadata=meta)
        save_velocity(self.rollout, d / "rollout.safetensors", metadata=meta)
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for pid, st in opt_state["state"].items():
            for name, val in st.items():
                tensors[f"{pid}.{name}"] = torch.as_tensor(val).contiguous()
        tmp = d / "optimizer.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={**meta, "param_groups": json.dumps(opt_state["param_groups"])})
        tmp.replace(d / "optimizer.safetensors")
        return d / "policy.safetensors"

    def load(self, directory: Path | str) -> None:
        """Restore what ``save`` wrote (policy, rollout policy, optimiser, step, version)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        d = Path(directory)
        for name in ("policy.safetensors", "rollout.safetensors", "optimizer.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"checkpoint {d} is incomplete: {name} missing")
        self.policy.load_state_dict(load_velocity(d / "policy.safetensors").state_dict())
        self.rollout.load_state_dict(load_velocity(d / "rollout.safetensors").state_dict())
        with safe_open(str(d / "optimizer.safetensors"), framework="pt") as f:
            meta = f.metadata()
        flat = load_file(str(d / "optimizer.safetensors"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, val in flat.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = val
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.step = int(meta["step"])
        self.version = int(meta["version"])
        self.scheduler.last_epoch = self.step

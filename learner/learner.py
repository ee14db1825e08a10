"""The learner: a trained policy, a frozen reference, a rollout policy, AdamW.

The rollout policy π_old is a frozen copy of π_θ refreshed every
``rollout_refresh_every`` optimiser steps (ORW-CFM-W2's "steps per epoch" H), either
copied or moved towards π_θ by an EMA (AdvantageFlow, DiffusionNFT) after every step or
once per refresh, with a constant decay or DiffusionNFT's schedule; its weights are
what samplers roll out, so each refresh is a new published version. The objective's
rule (learner/rules.py) turns a batch into the objective's inputs.
The learner owns reduction and accumulation: objectives return per-sample losses,
the learner sums them over micro-batches and divides by the batch size, so the
gradient does not depend on how the batch is cut.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from learner.group import LearnerGroup, full_tensor, local_like
from learner.pretrain import ema_update, rollout_ema_decay
from learner.rules import Batch, Prepared, build_rule, settings_json
from learner.settings import LearnerSettings, flatten
from samplers.policy import (
    AdapterDisabled,
    RolloutAdapter,
    SD3Velocity,
    is_adapted,
    is_adapter_key,
    load_adapter,
    lora_settings,
    published_state,
    read_tensors,
    save_tensors,
    save_velocity,
    state_checksum,
)
from samplers.text import PromptEmbeddings
from samplers.trajectory import Trajectory

__all__ = ["Learner", "LearnerGroup", "LearnerSettings", "WeightsPayload"]


@dataclass(frozen=True)
class WeightsPayload:
    """One published policy: versioned weights and their checksum."""

    version: int
    state: dict[str, torch.Tensor]
    checksum: str


Encode = Callable[[list[str]], PromptEmbeddings]


_RESUMABLE_SETTINGS = ("lr",)
"""Learner settings a resumed run may change (``--resume --set learner.lr=…``)."""


def _check_settings_kept(saved: dict[str, Any], now: dict[str, Any], d: Path) -> None:
    """Refuse to continue a checkpoint under other learner settings than it was trained with
    (a changed default after an upgrade included), naming the first few; a setting the saved
    file lacks (written by an older fmrl) is reported only for the objective being run."""
    section = {"orw_cfm_w2": "orw"}.get(now["objective"], now["objective"])
    old, new = flatten(saved), flatten(now)
    mine = [k for k in new if "." not in k or k.startswith(section + ".")]
    diff = [k for k in mine if k not in _RESUMABLE_SETTINGS and old.get(k, "absent") != new[k]]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k, 'absent')} → {new[k]}" for k in diff[:4])
        raise ValueError(f"checkpoint {d} was trained with other learner settings ({shown}"
                         f"{'; …' if len(diff) > 4 else ''}): resume it with the settings it was made with")


class Learner:
    """Turns scored trajectories into updates of π_θ and publishes π_old."""

    def __init__(self, policy: SD3Velocity, encode: Encode, settings: LearnerSettings,
                 group: LearnerGroup | None = None) -> None:
        self.settings = settings
        self.encode = encode
        # one of N data-parallel learners (learner/group.py), or the only one
        self.group = group or LearnerGroup()
        self.policy = policy.train()
        # where the policy's weights live: the batch, the interpolants and the critic go there too
        self.device = next(policy.parameters()).device
        # an adapted (LoRA) policy trains its adapter only; its reference is the same module
        # with the adapter switched off, and it publishes and checkpoints the adapter alone
        self.adapted = is_adapted(policy)
        self.reference: nn.Module = (AdapterDisabled(self.policy) if self.adapted
                                     else copy.deepcopy(policy).eval().requires_grad_(False))
        # π_old: a second, frozen adapter on the same module for an adapted policy (one adapter's
        # bytes, not a copy of the base), a frozen copy of a full policy
        self.rollout: RolloutAdapter | nn.Module = (RolloutAdapter(self.policy) if self.adapted
                                                    else copy.deepcopy(policy).eval().requires_grad_(False))
        tcfg = policy.transformer.config
        self.rule = build_rule(settings, tcfg.in_channels, tcfg.pooled_projection_dim)
        self.rule.to(self.device)
        if self.group.sharded:
            # FSDP: π_θ (and a full policy's reference and π_old) sharded over the ranks; its
            # backward reduce-scatters the gradients. The reference's checksum is taken whole first.
            self._reference_checksum()
            self.group.shard(self.policy)
            if not self.adapted:
                self.group.shard(self.reference)
                self.group.shard(self.rollout)
            self._synced: nn.Module = self.policy
        else:
            # DDP in a group (backward all-reduces the gradients); the policy itself when alone
            self._synced = self.group.wrap(self.policy)
        # the forward that trains (rules call ``ln.actor``)
        self.actor: nn.Module = self._synced
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        warm = max(1, settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.step_phase_seconds: list[dict[str, float]] = []  # per optimiser step of the last update
        self.version = 0

    # ---- updates -------------------------------------------------------------------
    def update(self, batch: Trajectory, rewards: torch.Tensor, prompts: list[str] | None = None) -> dict[str, float]:
        """``updates_per_batch`` optimiser steps on one scored batch; returns mean statistics.

        rewards: (B,) one reward per rollout of the whole batch. A single learner's ``batch`` is the
        whole batch; in a learner group it is this rank's rows (``group.rows(B)``) and ``prompts``
        the whole batch's B prompts (its own rows' must match them). The statistics are the whole
        batch's, the same on every rank. Raises on a NaN/inf reward rather than train on it.
        """
        rewards = rewards.to(torch.float32)
        total = int(rewards.shape[0]) if rewards.dim() == 1 else -1
        rows = self.group.rows(total) if self.group.distributed and total > 0 else None
        want = rows.size if rows is not None else total
        if total < 0 or batch.size != want:
            where = "" if rows is None else f" (rows {rows.lo}:{rows.hi} of the batch)"
            raise ValueError(f"expected {batch.size if rows is None else rows.total} rewards, one per rollout "
                             f"of {batch.size}{where}, got shape {tuple(rewards.shape)}")
        if not torch.isfinite(rewards).all():
            raise ValueError(f"{int((~torch.isfinite(rewards)).sum())} non-finite rewards in the batch")
        own = batch.prompt_list()
        if prompts is None:
            if rows is not None:
                raise ValueError("a learner rank needs the whole batch's prompts")
            prompts = own
        elif len(prompts) != total or (own != list(prompts[rows.slice] if rows else prompts)):
            raise ValueError("the batch's prompts do not match this learner's rollouts")
        dev = self.device
        states = batch.states.to(dev)
        scored = Batch(states[:, -1], self.encode(list(batch.prompts)).index(batch.prompt_ids).to(dev),
                       rewards.to(dev), list(prompts), batch.prompt_ids.to(dev), states, batch.times.to(dev),
                       None if batch.log_probs is None else batch.log_probs.to(dev), rows)
        totals: dict[str, float] = {}
        self.step_phase_seconds = []
        # a rule may split each pass over the batch into minibatches, one optimiser step each (Flow-GRPO)
        steps = self.settings.updates_per_batch * getattr(self.rule, "steps_per_batch", 1)
        for _ in range(steps):
            for k, v in self._optimizer_step(scored).items():
                totals[k] = totals.get(k, 0.0) + v / steps
        totals["rollout_version"] = float(batch.version)
        return totals

    def _optimizer_step(self, b: Batch) -> dict[str, float]:
        s = self.settings
        t0 = time.perf_counter()
        # whole-batch inputs first, so micro-batching changes nothing
        prep, stats, train_actor = self.rule.prepare(self, b)
        t1 = time.perf_counter()
        g = self.group
        mine = next(iter(prep.values())).shape[0]  # this learner's rows (a row per sample, or per step)
        n = int(g.sum([float(mine)])[0])  # the whole batch's
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        loss_sum = 0.0
        chunks = self._micro_batches(mine)
        for i, (lo, hi) in enumerate(chunks):
            last = i == len(chunks) - 1
            # an FSDP rank with fewer rows than the others still makes every forward (each is a
            # collective): on its first row, with weight 0
            mb: Prepared = {k: v[lo:hi] if hi > lo else v[:1] for k, v in prep.items()}
            # In a group, gradients accumulate locally and are reduced at the last micro-batch's
            # backward. Under DDP the earlier ones run the bare policy rather than DDP under
            # no_sync(): ranks may hold different numbers of micro-batches, and DDP's forward can
            # itself be a collective (its one-off bucket rebuild), so every rank makes exactly one
            # DDP forward per optimiser step.
            if g.sharded:
                self.policy.set_requires_gradient_sync(last)  # type: ignore[operator]
            else:
                self.actor = self._synced if train_actor and last else self.policy
            with contextlib.nullcontext() if train_actor else torch.no_grad():  # a frozen actor: statistics only
                losses, st = self.rule.losses(self, mb)
            if train_actor:
                loss = losses.sum() / n
                if hi == lo:
                    loss = loss * 0.0
                # DDP and FSDP average over the ranks; each rank's share of Σ/n is scaled back up
                (loss * g.world_size if g.distributed else loss).backward()
            if hi == lo:
                continue
            loss_sum += float(losses.detach().sum())
            for k, v in st.items():  # the objective's statistics: row-weighted over micro-batches,
                if k.endswith("_max"):  # or the largest
                    maxima[k] = max(maxima.get(k, -math.inf), float(v))
                else:
                    sums[k] = sums.get(k, 0.0) + float(v) * losses.shape[0]
        if g.distributed:  # the whole batch's statistics, the same on every rank
            keys = sorted(sums)
            loss_sum, *vals = g.sum([loss_sum, *(sums[k] for k in keys)])
            sums = dict(zip(keys, vals, strict=True))
            maxima = dict(zip(sorted(maxima), g.max([maxima[k] for k in sorted(maxima)]), strict=True))
        t2 = time.perf_counter()
        g.reshard(self.policy, self.reference, self.rollout)
        grad_norm = 0.0
        if train_actor:
            grad_norm = float(nn.utils.clip_grad_norm_(self.policy.parameters(), s.grad_clip))
            if not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                # the weights are untouched (no step was taken); the run stops at its last checkpoint
                raise FloatingPointError(
                    f"non-finite gradient (norm {grad_norm}) at learner step {self.step}, objective "
                    f"{s.objective} (loss {loss_sum / n:.4g}): no update was applied; lower learner.lr or "
                    f"the objective's temperature, or check the rewards' scale")
            self.optimizer.step()
            self.scheduler.step()
        stats.update(self.rule.after_step(self, prep))
        self.step += 1
        refresh = self.step % s.rollout_refresh_every == 0
        # the EMA after every step, or once per refresh (DiffusionNFT's once per epoch); its decay
        # is constant or follows DiffusionNFT's schedule of the optimiser steps so far
        if s.rollout_update == "ema" and (s.rollout_ema_every == "step" or refresh):
            decay = rollout_ema_decay(s.rollout_ema_schedule, self.step, s.rollout_ema_decay)
            if isinstance(self.rollout, RolloutAdapter):
                self.rollout.ema_from_policy(decay)
            else:
                ema_update(self.rollout, self.policy, decay)
        if refresh:
            self.refresh_rollout()
        self.step_phase_seconds.append({"prepare": t1 - t0, "forward_backward": t2 - t1,
                                        "optimizer": time.perf_counter() - t2})
        return {"loss": loss_sum / n, **{k: v / n for k, v in sums.items()}, **maxima, "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0], **stats}

    def _micro_batches(self, rows: int) -> list[tuple[int, int]]:
        """[lo, hi) of each micro-batch of this rank's ``rows``: learner.micro_batch_size rows each;
        with FSDP every rank makes as many as the rank that needs most (its forwards are
        collectives), cut evenly, so some may be empty."""
        mbs = self.settings.micro_batch_size
        if not self.group.sharded:
            return [(lo, min(lo + mbs, rows)) for lo in range(0, rows, mbs)]
        k = int(self.group.max([float(-(-rows // mbs))])[0])
        return [(rows * i // k, rows * (i + 1) // k) for i in range(k)]

    # ---- publishing ----------------------------------------------------------------
    def refresh_rollout(self) -> None:
        """Make the rollout policy the next published version (π_old ← π_θ when copying;
        with an EMA rollout policy its current average is published)."""
        if self.settings.rollout_update == "copy":
            if isinstance(self.rollout, RolloutAdapter):
                self.rollout.copy_from_policy()
            else:
                self.rollout.load_state_dict(self.policy.state_dict())
        self.version = self.step

    def _rollout_state(self) -> dict[str, torch.Tensor]:
        """π_old's published tensors (named as π_θ's: samplers hold one adapter)."""
        if isinstance(self.rollout, RolloutAdapter):
            return self.rollout.state()
        return published_state(self.rollout)

    def publish(self, current: bool = False) -> WeightsPayload:
        """The rollout policy's weights (or π_θ's when ``current``), with version and checksum."""
        self.group.reshard(self.policy, self.rollout)
        src = published_state(self.policy) if current else self._rollout_state()
        # an FSDP group's shards are gathered: every rank calls publish, in the same order
        state = {k: full_tensor(v).detach().clone() for k, v in src.items()}
        return WeightsPayload(self.step if current else self.version, state, state_checksum(state))

    # ---- checkpoints ---------------------------------------------------------------
    # What a bitwise-identical resume needs, and where ``save`` keeps it:
    #   policy.safetensors / rollout.safetensors  π_θ and π_old (EMA or copy)
    #   optimizer.safetensors tensors             AdamW moments and step counts ("<pid>.<name>"),
    #                                             the interpolant generator ("learner.generator"),
    #                                             the rule's tensors ("rule.*": AC-Flow's critic and
    #                                             its AdamW)
    #   optimizer.safetensors metadata            step, version, the LambdaLR state, AdamW's param
    #                                             groups, the rule's JSON state (reward trackers,
    #                                             critic optimiser groups), the settings and the
    #                                             frozen reference's checksum
    # Updates draw randomness only from ``self.generator`` (never the global torch RNG), and the
    # reference is rebuilt by the constructor, so it is checked (by checksum), not stored.
    _GENERATOR_KEY = "learner.generator"

    def _reference_checksum(self) -> str:
        """The frozen reference's checksum, computed once (it never changes)."""
        cached = getattr(self, "_reference_checksum_cache", None)
        if cached is None:
            ref = self.reference
            cached = state_checksum(ref.base_state() if isinstance(ref, AdapterDisabled) else ref.state_dict())
            self._reference_checksum_cache = cached
        return cached

    def save(self, directory: Path | str) -> Path:
        """policy.safetensors (a full policy's is loadable by ``fmrl sample``; an adapted one
        keeps only its adapter, the base stays in the pipeline directory), rollout.safetensors and
        optimizer.safetensors: everything ``load`` needs to continue bitwise identically. Each file
        records its SHA-256 digest (``samplers.policy.save_tensors``), which ``load`` verifies."""
        g = self.group
        g.reshard(self.policy, self.rollout)
        # An FSDP group's shards are gathered into whole tensors on rank 0 (every rank calls save,
        # in the same order), so its checkpoint is the same unsharded files as one learner's.
        policy = self._gathered({k: v for k, v in self.policy.transformer.state_dict().items()
                                 if is_adapter_key(k) or not self.adapted})
        if isinstance(self.rollout, RolloutAdapter):
            rollout = self._gathered({k.removeprefix("transformer."): v for k, v in self.rollout.state().items()})
        else:
            rollout = self._gathered(self.rollout.transformer.state_dict())
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = self._gathered(
            {f"{pid}.{name}": torch.as_tensor(val) for pid, st in opt_state["state"].items() for name, val in st.items()})
        if g.rank != 0:
            return Path(directory) / "policy.safetensors"
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(self.step), "version": str(self.version),
                "scheduler_epoch": str(self.scheduler.last_epoch),
                "settings": settings_json(self.settings),
                # unsharded files (an FSDP group's are gathered): any number of ranks resumes from them
                "learner_group": json.dumps({"world_size": g.world_size, "sharding": g.sharding})}
        save_velocity(self.policy, d / "policy.safetensors", metadata=meta, adapter_only=self.adapted, state=policy)
        if isinstance(self.rollout, RolloutAdapter):  # π_old's adapter, in the layout of the policy's
            save_tensors(d / "rollout.safetensors", rollout, {
                "transformer_config": json.dumps(dict(self.policy.transformer.config)),
                "lora": json.dumps(lora_settings(self.policy)), "adapter_only": "1", **meta})
        else:
            save_velocity(self.rollout, d / "rollout.safetensors", metadata=meta, state=rollout)
        tensors[self._GENERATOR_KEY] = self.generator.get_state().contiguous()
        rule_tensors, rule_meta = self.rule.state()
        tensors.update({f"rule.{k}": v for k, v in rule_tensors.items()})
        save_tensors(d / "optimizer.safetensors", tensors,
                     {**meta, "param_groups": json.dumps(opt_state["param_groups"]),
                      "scheduler": json.dumps(self.scheduler.state_dict()),
                      "reference_checksum": self._reference_checksum(), "rule": json.dumps(rule_meta)})
        return d / "policy.safetensors"

    def _gathered(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole CPU copies of ``state``'s tensors on rank 0 (gathered from FSDP shards; every
        rank calls this, in the same order); the other ranks keep nothing."""
        out = {}
        for k, v in state.items():
            whole = full_tensor(v)
            if self.group.rank == 0:
                out[k] = whole.detach().cpu().contiguous()
        return out

    def load(self, directory: Path | str) -> None:
        """Restore what ``save`` wrote, so that the learner continues exactly as the saved one.

        Raises, before changing anything, on a missing, damaged or corrupt file (each file's
        recorded SHA-256 digest is verified; the message names the file), a checkpoint of another
        objective, files from different steps (a save cut short) or another frozen reference.
        (Later mismatches, e.g. other tracker settings or weight shapes, also raise but may
        leave the learner partly loaded.)

        The learning rate is the one exception to "exactly": when this learner's ``settings.lr``
        differs from the checkpoint's, the schedule continues from its step with the new base
        rate (an ``lr`` override on resume takes effect rather than being overwritten).
        """
        d = Path(directory)
        names = ("policy.safetensors", "rollout.safetensors", "optimizer.safetensors")
        for name in names:
            if not (d / name).is_file():
                raise FileNotFoundError(f"checkpoint {d} is incomplete: {name} missing")
        files = {name: read_tensors(d / name) for name in names}
        metas = {name: m for name, (m, _) in files.items()}
        meta = metas["optimizer.safetensors"]
        if "settings" in meta:
            saved_settings = json.loads(meta["settings"])
            saved = saved_settings.get("objective")
            if saved != self.settings.objective:
                raise ValueError(f"checkpoint {d} was written by objective {saved!r}, "
                                 f"this learner runs {self.settings.objective!r}")
            _check_settings_kept(saved_settings, json.loads(settings_json(self.settings)), d)
        steps = {name: m.get("step") for name, m in metas.items()}
        if len(set(steps.values())) != 1:
            raise ValueError(f"checkpoint {d} mixes files from different steps {steps} (an interrupted save?)")
        if "reference_checksum" in meta and meta["reference_checksum"] != self._reference_checksum():
            raise ValueError(f"checkpoint {d} was trained against another reference policy than this "
                             "learner's (build the learner from the same initial policy before loading)")
        saved_lora = json.loads(metas["policy.safetensors"].get("lora", "null"))
        own_lora = lora_settings(self.policy) if self.adapted else None
        if saved_lora != own_lora:
            raise ValueError(f"checkpoint {d} was written with LoRA {saved_lora}, this learner's policy has "
                             f"{own_lora} (another LoRA rank or target modules?)")
        flat = dict(files["optimizer.safetensors"][1])
        generator_state = flat.pop(self._GENERATOR_KEY, None)
        rule_tensors = {k[5:]: v for k, v in flat.items() if k.startswith("rule.")}
        state: dict[int, dict[str, torch.Tensor]] = {}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for key, val in flat.items():
            if key.startswith("rule."):
                continue
            pid, name = key.split(".", 1)
            param = params[int(pid)] if int(pid) < len(params) else None
            if param is not None and val.shape == param.shape:  # a moment: laid out as its parameter
                val = local_like(param, val)
            state.setdefault(int(pid), {})[name] = val
        # the transformers' weights as save_velocity wrote them, loaded in place: load_velocity
        # would build two models, drawing from the global torch RNG and costing their memory
        policy_state = files["policy.safetensors"][1]
        rollout_state = files["rollout.safetensors"][1]
        del files

        # the rule first: its own checks (tracker settings) may still refuse the checkpoint
        self.rule.load_state(rule_tensors, json.loads(meta.get("rule", "{}")))
        # whole tensors laid out as this learner's own (its shards, in an FSDP group)
        own = self.policy.transformer.state_dict()
        policy_state = {k: local_like(own[k], v) if k in own else v for k, v in policy_state.items()}
        if isinstance(self.rollout, RolloutAdapter):  # the files hold adapters; the base is this learner's own
            load_adapter(self.policy, policy_state, f"checkpoint {d}")
            mine = self.rollout.state()
            self.rollout.load({f"transformer.{k}": local_like(mine[f"transformer.{k}"], v)
                               if f"transformer.{k}" in mine else v for k, v in rollout_state.items()})
        else:
            self.policy.transformer.load_state_dict(policy_state)
            own = self.rollout.transformer.state_dict()
            self.rollout.transformer.load_state_dict({k: local_like(own[k], v) if k in own else v
                                                      for k, v in rollout_state.items()})
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.step = int(meta["step"])
        self.version = int(meta["version"])
        if "scheduler" in meta:
            self.scheduler.load_state_dict(json.loads(meta["scheduler"]))
        else:  # older checkpoints: the saved param groups carry the scheduled lr
            self.scheduler.last_epoch = int(meta["scheduler_epoch"])
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # noqa: SLF001
        if self.scheduler.base_lrs != [self.settings.lr] * len(self.scheduler.base_lrs):
            self._rebase_lr(self.settings.lr)
        if generator_state is not None:
            self.generator.set_state(generator_state)
        else:
            warnings.warn(f"checkpoint {d} predates saved generator state: the learner resumes with a "
                          "freshly seeded generator, not exactly where it stopped", stacklevel=2)

    def _rebase_lr(self, lr: float) -> None:
        """Make ``lr`` the schedule's base rate from the current step on: LambdaLR's base rates,
        the groups' ``initial_lr`` (which a rebuilt scheduler would read) and the rate in force now."""
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        factors = [fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]
        for group, factor in zip(self.optimizer.param_groups, factors, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # noqa: SLF001

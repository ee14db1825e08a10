"""The driver loop: wire the actors, move references, publish weights, write the run.

One iteration (synchronous, on-policy up to the learner's refresh interval H):

    samplers ── rollout(prompts, seeds) ──► trajectory refs
    reward   ── score(*refs) ─────────────► scores ref
    learner  ── update(scores, *refs) ────► statistics (and maybe a new version)
    learner  ── publish() ─► weights ref ─► every sampler applies it, reports its version
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import ray

from reward_workers.digits import HeldoutSVM, prompt_digit
from services.actors import start_actors
from services.config import TrainConfig, dump_config
from services.evaluation import Evaluation, mean_pairwise_distance
from services.report import reward_curve, sample_grid, summary_table
from services.world import policy_checkpoint

log = logging.getLogger("fmrl")


class VersionMismatch(RuntimeError):
    """A sampler reports a policy version other than the one the learner published."""


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integers (run seed, iteration, prompt index, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """Cut ``items`` into ``parts`` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append(items[lo:hi])
        lo = hi
    return out


def ensure_ray(cfg: TrainConfig) -> bool:
    """Join the cluster at RAY_ADDRESS if set, else start an embedded one. True if started here."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

        # Under `ray job submit` Ray merges the job's runtime_env into ray.init's and refuses
        # (ValueError) an env var both set, so the job's values (deploy/runtime_env.yaml) win.
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
        taken = (job.get("runtime_env") or {}).get("env_vars") or {}
        env = {"env_vars": {k: v for k, v in env["env_vars"].items() if k not in taken}}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, logging_level=logging.WARNING)
        return False
    ray.init(num_cpus=cfg.resources.ray_num_cpus, include_dashboard=False, runtime_env=env,
             logging_level=logging.WARNING, configure_logging=True)
    return True


@dataclass
class Stages:
    samplers: list[Any]
    reward: Any
    learner: Any

    def rollout(self, prompts: list[str], samples_per_prompt: int, seeds: list[int],
                cfg_scale: float | None = None, kind: str | None = None) -> list[Any]:
        """Trajectory refs, the prompts divided among samplers (the order is kept)."""
        pairs = list(zip(prompts, seeds, strict=True))
        return [
            s.rollout.remote([p for p, _ in chunk], samples_per_prompt, [z for _, z in chunk], cfg_scale, kind)
            for s, chunk in zip(self.samplers, split_evenly(pairs, len(self.samplers)), strict=True)
            if chunk
        ]

    def sync(self, current: bool = False) -> list[int]:
        """Publish the learner's weights to every sampler; returns the version each applied,
        after checking it (and its checksum) against what the learner published."""
        payload = self.learner.publish.remote(current)
        applied = ray.get([s.apply_weights.remote(payload) for s in self.samplers])
        want = ray.get(payload)
        for i, (version, checksum) in enumerate(applied):
            if version != want.version or checksum != want.checksum:
                raise VersionMismatch(f"sampler {i} applied version {version} ({checksum[:12]}), "
                                      f"learner published {want.version} ({want.checksum[:12]})")
        return [v for v, _ in applied]


def evaluate(stages: Stages, cfg: TrainConfig, version: int, svm: HeldoutSVM) -> Evaluation:
    """CFG-free ODE samples of every prompt from fixed noise, scored by the reward and the SVM
    (the same measurement whichever sampler the algorithm trains with)."""
    prompts = list(dict.fromkeys(cfg.rollout.prompts))
    n = cfg.eval.samples_per_prompt
    seeds = [seed_for(cfg.eval.seed, i) for i in range(len(prompts))]
    refs = stages.rollout(prompts, n, seeds, cfg_scale=1.0, kind="ode")
    scored = ray.get(stages.reward.score.remote(*refs))
    flat = np.concatenate([t.images for t in ray.get(refs)])
    images = flat.reshape(len(prompts), n, *flat.shape[1:])
    target = np.repeat([prompt_digit(p) for p in prompts], n)
    correct = svm.predict(images.reshape(-1, *images.shape[2:])) == target
    per_reward = scored["scores"].reshape(len(prompts), n).mean(1)
    per_div = [mean_pairwise_distance(images[i]) for i in range(len(prompts))]
    return Evaluation(
        version=version, prompts=tuple(prompts), images=images,
        reward=float(scored["scores"].mean()), accuracy=float(correct.mean()),
        diversity=float(np.mean(per_div)),
        per_prompt_reward=tuple(float(x) for x in per_reward),
        per_prompt_diversity=tuple(float(x) for x in per_div),
    )


def make_run_dir(cfg: TrainConfig, config_name: str) -> Path:
    name = cfg.run.name or f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run_dir = cfg.run.out_dir / name
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} already exists; choose another run.name")
    run_dir.mkdir(parents=True)
    return run_dir


def batch_plan(cfg: TrainConfig, it: int) -> tuple[list[str], list[int]]:
    """Iteration ``it``'s prompts (cycling through the list) and their noise seeds."""
    prompts, per_it = cfg.rollout.prompts, cfg.rollout.batch_prompts
    chosen = [prompts[(it * per_it + k) % len(prompts)] for k in range(per_it)]
    return chosen, [seed_for(cfg.run.seed, it, k) for k in range(per_it)]


def train_iteration(stages: Stages, cfg: TrainConfig, it: int, version: int) -> tuple[dict[str, Any], list[int] | None]:
    """Rollout → reward → update; publish when the learner has a new version.

    Returns the learner's statistics and, after a publish, the version each sampler applied.
    """
    prompts, seeds = batch_plan(cfg, it)
    refs = stages.rollout(prompts, cfg.rollout.samples_per_prompt, seeds)
    stats = ray.get(stages.learner.update.remote(stages.reward.score.remote(*refs), *refs))
    if stats["rollout_version"] != version:
        raise VersionMismatch(f"iteration {it} trained on version {stats['rollout_version']}, "
                              f"samplers were at {version}")
    return stats, (stages.sync() if stats["version"] != version else None)


def write_outputs(run_dir: Path, before: Evaluation, after: Evaluation, extra: dict[str, Any],
                  grid_columns: int, probability: bool = True) -> dict[str, Any]:
    """The grid, the curve, summary.json and summary.txt; prints the table. ``probability``:
    the reward is a probability (the digits classifier alone), which has a target p + (1 − p)/2."""
    sample_grid(before, after, run_dir / "samples_before_after.png", grid_columns)
    reward_curve(run_dir / "metrics.jsonl", run_dir / "reward_curve.png", probability)
    table = summary_table(before, after)
    summary = {"run_dir": str(run_dir), **extra, "before": before.headline(), "after": after.headline()}
    if probability:
        summary["target_reward"] = before.reward + (1 - before.reward) / 2
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.txt").write_text(table + "\n")
    print(table)
    return summary


def train(cfg: TrainConfig, config_name: str = "digits") -> dict[str, Any]:
    """Run the job the config describes; returns the summary (also written to the run)."""
    from tqdm import tqdm

    policy_checkpoint(cfg.policy)  # fail before any directory or cluster exists
    run_dir = make_run_dir(cfg, config_name)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    started_ray = ensure_ray(cfg)
    t0 = time.time()
    try:
        stages = Stages(*start_actors(cfg))
        svm = HeldoutSVM()
        before = evaluate(stages, cfg, 0, svm)
        version, applied = 0, [0] * len(stages.samplers)
        with (run_dir / "metrics.jsonl").open("w") as mf, \
                tqdm(total=cfg.run.iterations, disable=not cfg.run.progress, desc="train", unit="it",
                     dynamic_ncols=True) as bar:
            mf.write(json.dumps({"kind": "eval", "when": "before", "version": 0, **before.headline()}) + "\n")
            for it in range(cfg.run.iterations):
                stats, synced = train_iteration(stages, cfg, it, version)
                if synced is not None:
                    applied, version = synced, synced[0]
                row = {"kind": "train", "iteration": it, "time_s": round(time.time() - t0, 3),
                       "sampler_versions": applied, **stats}
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", v=version)
                bar.update(1)
            final_version = stages.sync(current=True)[0]
            after = evaluate(stages, cfg, final_version, svm)
            mf.write(json.dumps({"kind": "eval", "when": "after", "version": final_version, **after.headline()}) + "\n")
        ckpt = ray.get(stages.learner.save.remote(str((run_dir / "checkpoint").resolve())))
        summary = write_outputs(run_dir, before, after, {
            "checkpoint": ckpt, "seconds": round(time.time() - t0, 1),
            "heldout_classifier_accuracy_on_real": svm.heldout_accuracy}, cfg.eval.grid_columns,
            probability=[(c.kind, c.weight) for c in cfg.reward.components] == [("digits_classifier", 1.0)])
        print(f"\nrun written to {run_dir} ({summary['seconds']} s)")
        return summary
    finally:
        if started_ray:
            ray.shutdown()

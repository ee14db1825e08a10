"""`fmrl eval`: a checkpoint's samples scored by every configured reward, the held-out
classifier (digits world) and diversity, with a sample grid — in this process, no cluster.

The samples are the run's own evaluation (CFG-free ODE, noise seeded per prompt from
``eval.seed``), so evaluating a run's final checkpoint reproduces its "after" figures.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reward_workers.digits import HeldoutSVM, prompt_digit
from samplers.policy import load_weights
from samplers.sampler import Sampler
from services.config import TrainConfig, load_config
from services.evaluation import eval_plan, evaluation_of
from services.report import eval_grid
from services.rewards import RewardStage, component_means
from services.world import load_policy, resolve_checkpoint


def _resolve(checkpoint: Path, config: str | None, overrides: list[str]) -> tuple[TrainConfig, Path, Path | None]:
    """(config, policy file, run directory or None) for a run dir, checkpoint dir or policy file."""
    run = checkpoint if (checkpoint / "config.yaml").is_file() else None
    cfg = load_config(run / "config.yaml" if run is not None and config is None else config, overrides)
    return cfg, resolve_checkpoint(checkpoint), run


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line)")
    return list(dict.fromkeys(prompts))


def evaluate_checkpoint(checkpoint: Path, config: str | None = None, prompts_file: Path | None = None,
                        samples: int | None = None, out: Path | None = None,
                        overrides: list[str] | None = None) -> dict[str, Any]:
    cfg, policy_file, run = _resolve(checkpoint, config, list(overrides or []))
    prompts, seeds = eval_plan(cfg, read_prompts(prompts_file) if prompts_file else None)
    n = cfg.eval.samples_per_prompt if samples is None else samples  # 0 is refused below, not replaced
    if n < 2:
        raise ValueError(f"-n must be at least 2 (diversity compares samples), got {n}")
    if cfg.reward.uses("digits_classifier"):
        for p in prompts:
            prompt_digit(p)  # raises, naming the prompt, when it names no single digit
    parts = load_policy(cfg.policy)
    load_weights(parts.velocity, policy_file)
    sampler = Sampler(parts.velocity, parts.encode, parts.decode, parts.latent_shape,
                      num_steps=cfg.policy.num_steps, shift=cfg.policy.shift, cfg_scale=1.0, keep_states=False)
    traj = sampler.rollout(prompts, n, seeds, cfg_scale=1.0, kind="ode")
    scored = RewardStage(cfg.reward).score(traj.images, traj.prompt_list())
    images = traj.images.reshape(len(prompts), n, *traj.images.shape[1:])
    accuracy = None
    if cfg.policy.kind == "digits" and all(_is_digit_prompt(p) for p in prompts):
        accuracy = float(HeldoutSVM()(traj.images, traj.prompt_list()).scores.mean())
    ev = evaluation_of(-1, prompts, images, scored["scores"], accuracy)
    stamp = f"eval-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    out = out or ((run / stamp) if run is not None else Path(stamp))
    out.mkdir(parents=True, exist_ok=False)
    eval_grid(ev, out / "grid.png", min(cfg.eval.grid_columns, n))
    result = {"checkpoint": str(policy_file), "prompts": prompts, "samples_per_prompt": n, **ev.headline(),
              "rewards": {k.removeprefix("reward/"): v for k, v in component_means(scored, cfg.reward).items()
                          if k.startswith("reward/")},
              "per_prompt_reward": dict(zip(prompts, ev.per_prompt_reward, strict=True)),
              "per_prompt_diversity": dict(zip(prompts, ev.per_prompt_diversity, strict=True))}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    result["out"] = str(out)
    return result


def _is_digit_prompt(p: str) -> bool:
    try:
        prompt_digit(p)
    except ValueError:
        return False
    return True

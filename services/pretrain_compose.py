"""``fmrl pretrain-compose``: the shipped compositional digits policy, remade from scratch.

Flow matching (learner/pretrain.py, as ``fmrl pretrain-digits``) on random compositions of
train-split digits on the 2×2 canvas, each described by a true training prompt
(samplers/compose.py), the prompt dropped 10 % of the time so that CFG works. Deliberately
short: the base follows prompts far better with CFG than without, so RL has a gap to close.
The command then measures the base on the evaluation specs, CFG-free and with CFG, in the
training templates and in the held-out phrasings, by the compose reward and by the held-out
evaluator; the report goes into the file's metadata and beside it as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from learner.pretrain import PretrainSettings
from reward_workers.compose import ComposeReward, HeldoutComposeEvaluator
from reward_workers.digits import load_split
from samplers import compose, digits
from samplers.policy import build_sd3_velocity, save_velocity
from samplers.sampler import Sampler
from samplers.text import PromptEmbeddings, PromptEncoder
from services.pretrain import pretrain_with_progress

TRAIN_CANVASES = 20_000
REAL_SEED = 7


class PerExample:
    """Embeddings of N examples stored as the distinct prompts' rows and an index (N,): what
    ``pretrain_flow_matching`` takes as ``cond`` (it only calls ``index``), without N copies of
    a (16, 384) token block."""

    def __init__(self, distinct: PromptEmbeddings, ids: np.ndarray) -> None:
        self.distinct, self.ids = distinct, torch.from_numpy(ids)

    def index(self, idx: torch.Tensor) -> PromptEmbeddings:
        return self.distinct.index(self.ids[idx])


def real_compositions(specs: list[compose.Spec], per_spec: int = 5, seed: int = REAL_SEED
                      ) -> tuple[np.ndarray, list[dict]]:
    """Canvases of held-out digits laid out as each spec asks (``per_spec`` each) and their
    metadata: what a perfect policy would draw, for the readers' own accuracy."""
    split, rng = load_split(), np.random.default_rng(seed)
    canvases = [compose.render(compose.layout(s, rng), split.heldout_images, split.heldout_labels, rng)
                for s in specs for _ in range(per_spec)]
    return np.stack(canvases), [compose.spec_metadata(s) for s in specs for _ in range(per_spec)]


def heldout_evaluator() -> HeldoutComposeEvaluator:
    """The evaluation-only reader, its accuracy on real compositions of the evaluation specs measured."""
    return HeldoutComposeEvaluator(real_compositions(compose.eval_specs()))


def measure(sampler: Sampler, reward: ComposeReward, evaluator: HeldoutComposeEvaluator, cfg_scale: float,
            train_phrasing: bool, n: int = 16, seed: int = 1) -> dict[str, float]:
    """``n`` samples of each evaluation spec at ``cfg_scale``, in the first training template or the
    held-out phrasings: the reward's mean, its all-or-nothing accuracy and per-constraint means,
    and the held-out evaluator's all-or-nothing accuracy."""
    specs = compose.eval_specs()
    prompts = [compose.prompt_of(s, 0 if train_phrasing else i % 2, train=train_phrasing) for i, s in enumerate(specs)]
    meta = [compose.spec_metadata(s) for s in specs for _ in range(n)]
    traj = sampler.rollout(prompts, n, [seed * 1000 + i for i in range(len(prompts))], cfg_scale=cfg_scale)
    out = reward(traj.images, traj.prompt_list(), meta)
    held = evaluator(traj.images, traj.prompt_list(), meta)
    return {"reward": float(out.scores.mean()), "accuracy": float(out.details["all"].mean()),
            "count": float(out.details["count"].mean()), "identity": float(out.details["identity"].mean()),
            "position_where_asked": float(out.details["position"][out.details["position_asked"] == 1].mean()),
            "heldout_accuracy": float(held.scores.mean())}


def pretrain_compose(out: Path, steps: int = 1500, seed: int = 0, eval_samples: int = 16,
                     canvases: int = TRAIN_CANVASES) -> dict[str, object]:
    torch.set_num_threads(1)  # as pretrain-digits: too small a model for intra-op threads to pay
    split = load_split()
    images, prompts, ids = compose.training_set(canvases, split.train_images, split.train_labels, seed)
    encoder = PromptEncoder()
    data = digits.to_pixels(images)
    cond = PerExample(encoder.encode(prompts), ids)
    torch.manual_seed(seed)
    model = build_sd3_velocity(dict(compose.COMPOSE_TRANSFORMER_CONFIG))
    settings = PretrainSettings(steps=steps, seed=seed, warmup_steps=min(200, steps // 4 + 1))
    t0 = time.time()
    ema = pretrain_with_progress(model, data, cond, encoder.encode([""]), settings, "pretrain-compose")
    train_s = time.time() - t0
    report: dict[str, object] = {
        "command": f"fmrl pretrain-compose --steps {steps} --seed {seed} --eval-samples {eval_samples}"
                   + (f" --canvases {canvases}" if canvases != TRAIN_CANVASES else ""),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "train_canvases": canvases,
        "distinct_train_prompts": len(prompts),
        "settings": settings.__dict__,
    }
    if eval_samples > 0:
        sampler = Sampler(ema, encoder.encode, digits.to_uint8, compose.IMAGE_SHAPE, num_steps=10, keep_states=False)
        reward, evaluator = ComposeReward(), heldout_evaluator()
        real = real_compositions(compose.eval_specs())
        report["eval_samples_per_prompt"] = eval_samples
        report["readers_on_real_compositions"] = {
            "reward_accuracy": float(reward(real[0][..., None], [""] * len(real[1]), real[1]).details["all"].mean()),
            "heldout_accuracy": evaluator.heldout_accuracy}
        report["eval"] = {f"{'train' if tr else 'heldout'}_phrasing_cfg_{s}":
                          measure(sampler, reward, evaluator, s, tr, eval_samples)
                          for tr in (True, False) for s in (1.0, 2.0, 3.0)}
    # the file records everything but the wall time, so the same command makes the same bytes
    save_velocity(ema, out, metadata={"pretrain_report": json.dumps(report)})
    out.with_suffix(".json").write_text(json.dumps({**report, "train_seconds": round(train_s, 1)}, indent=2) + "\n")
    for name, m in report.get("eval", {}).items():  # type: ignore[union-attr]
        print(f"{name}: compositional accuracy {m['accuracy']:.3f} (held-out evaluator {m['heldout_accuracy']:.3f}), "
              f"reward {m['reward']:.3f}")
    print(f"wrote {out} ({report['parameters']} parameters, {train_s:.0f} s)")
    return {**report, "train_seconds": round(train_s, 1)}

"""``fmrl pretrain-digits``: the shipped digits policy, remade from scratch.

Flow matching on the train part of the digits, every image paired with each prompt
template, the prompt dropped (replaced by the empty prompt) 10% of the time so that
classifier-free guidance works. The command then measures what the issue asks of the
shipped weights: with CFG, the held-out SVM reads the prompted digit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.pretrain import PretrainSettings, pretrain_flow_matching
from reward_workers.digits import DigitsClassifierReward, HeldoutSVM, load_split
from samplers import digits
from samplers.policy import build_sd3_velocity, save_velocity
from samplers.sampler import Sampler
from samplers.text import PromptEncoder


def measure_prompt_accuracy(sampler: Sampler, svm: HeldoutSVM, reward: DigitsClassifierReward,
                            cfg_scale: float, n: int = 50, seed: int = 1) -> dict[str, float]:
    """Samples of every digit in the first template at ``cfg_scale``: SVM accuracy and mean reward."""
    prompts = digits.default_prompts()
    traj = sampler.rollout(prompts, n, [seed * 100 + i for i in range(10)], cfg_scale=cfg_scale)
    target = np.repeat(np.arange(10), n)
    out = reward(traj.images, traj.prompt_list())
    return {"svm_accuracy": float((svm.predict(traj.images) == target).mean()),
            "reward": float(out.scores.mean()), "cnn_accuracy": float(out.details["correct"].mean())}


def pretrain_with_progress(model: Any, data: torch.Tensor, cond: Any, uncond: Any, settings: PretrainSettings,
                           desc: str) -> Any:
    """``pretrain_flow_matching`` with a progress bar (the loss every 50 steps); returns the EMA model."""
    from tqdm import tqdm

    with tqdm(total=settings.steps, desc=desc, unit="step", dynamic_ncols=True) as bar:
        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        return pretrain_flow_matching(model, data, cond, uncond, settings, on_step)


def pretrain_digits(out: Path, steps: int = 800, seed: int = 0, eval_samples: int = 50) -> dict[str, object]:
    # one thread: this model is too small for intra-op parallelism to pay (measured
    # 0.15 s/step on 1 thread, 0.26 s/step on 2 on the 2-core build machine)
    torch.set_num_threads(1)
    split = load_split()
    encoder = PromptEncoder()
    k = len(digits.TEMPLATES)
    data = digits.to_pixels(np.concatenate([split.train_images] * k))
    prompts = [digits.prompt_for(int(y), j) for j in range(k) for y in split.train_labels]
    torch.manual_seed(seed)
    model = build_sd3_velocity(dict(digits.DIGITS_TRANSFORMER_CONFIG))
    settings = PretrainSettings(steps=steps, seed=seed)
    t0 = time.time()
    ema = pretrain_with_progress(model, data, encoder.encode(prompts), encoder.encode([""]), settings, "pretrain")
    train_s = time.time() - t0
    sampler = Sampler(ema, encoder.encode, digits.to_uint8, digits.IMAGE_SHAPE, num_steps=10, keep_states=False)
    svm, reward = HeldoutSVM(split), DigitsClassifierReward()
    report: dict[str, object] = {
        "command": f"fmrl pretrain-digits --steps {steps} --seed {seed}",
        "parameters": sum(p.numel() for p in ema.parameters()),
        "train_seconds": round(train_s, 1),
        "settings": settings.__dict__,
        "eval_samples_per_digit": eval_samples,
        "eval": {f"cfg_{s}": measure_prompt_accuracy(sampler, svm, reward, s, eval_samples) for s in (1.0, 2.0, 3.0)},
    }
    save_velocity(ema, out, metadata={"pretrain_report": json.dumps(report)})
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    for name, m in report["eval"].items():  # type: ignore[union-attr]
        print(f"{name}: held-out SVM reads the prompted digit in {m['svm_accuracy']:.3f}, "
              f"reward {m['reward']:.3f}")
    print(f"wrote {out} ({report['parameters']} parameters, {train_s:.0f} s)")
    return report

"""Writes the compositional digits world's prompt datasets beside it (docs/compose.md).

    python configs/datasets/make_compose_datasets.py   # rewrites the three compose_*.jsonl

- compose_train.jsonl: the RL training prompts, a small fixed set so that a 200-iteration run
  (10 prompts an iteration) revisits each prompt ~30 times: ``TRAIN_PER_TASK`` specs of each
  task drawn (``TRAIN_SEED``) from the grammar's specs (samplers/compose.py ``all_specs``) that
  are not evaluation specs, each in one training template (alternating), 64 prompts;
- compose_eval.jsonl: the 40 evaluation specs (``eval_specs``: held-out *combinations*, no
  training prompt asks any of them) in the training templates (alternating): the main
  evaluation, read by the held-out evaluator;
- compose_eval_phrasings.jsonl: the same 40 specs in the held-out phrasings (``EVAL_PHRASINGS``,
  alternating), never a training wording: the second, generalisation figure
  (``fmrl eval --checkpoint RUN --set eval.dataset.path=configs/datasets/compose_eval_phrasings.jsonl``).

Each row: ``prompt``, the constraints (``task``, ``counts``, ``relation``, ``region``: what the
compose reward checks) and ``template`` (training wordings) or ``phrasing`` (held-out wordings).
Nothing random but fixed seeded draws, so the files are the same on every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from samplers.compose import TASKS, all_specs, eval_specs, prompt_of, spec_metadata  # noqa: E402

TRAIN_PER_TASK = 16   # 4 tasks × 16 specs = 64 training prompts
TRAIN_SEED = 2        # the training specs' draw (eval_specs uses seed 1)


def train_specs() -> list:
    """``TRAIN_PER_TASK`` specs of each task, none of them an evaluation spec, fixed by ``TRAIN_SEED``."""
    rng = np.random.default_rng(TRAIN_SEED)
    held = set(eval_specs())
    out = []
    for t in TASKS:
        pool = [s for s in all_specs() if s.task == t and s not in held]
        out += [pool[int(i)] for i in sorted(rng.choice(len(pool), TRAIN_PER_TASK, replace=False))]
    return out


def train_rows() -> list[dict]:
    return [{"prompt": prompt_of(s, i % 2), **spec_metadata(s), "template": i % 2}
            for i, s in enumerate(train_specs())]


def eval_rows() -> list[dict]:
    """The main evaluation: held-out combinations in the training templates."""
    return [{"prompt": prompt_of(s, i % 2), **spec_metadata(s), "template": i % 2}
            for i, s in enumerate(eval_specs())]


def eval_phrasing_rows() -> list[dict]:
    """The generalisation figure: the same held-out combinations in the held-out phrasings."""
    return [{"prompt": prompt_of(s, i % 2, train=False), **spec_metadata(s), "phrasing": i % 2}
            for i, s in enumerate(eval_specs())]


FILES = {"compose_train.jsonl": train_rows, "compose_eval.jsonl": eval_rows,
         "compose_eval_phrasings.jsonl": eval_phrasing_rows}


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    for name, rows in FILES.items():
        write(name, rows())

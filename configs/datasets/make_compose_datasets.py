"""Writes the compositional digits world's prompt datasets beside it (docs/compose.md).

    python configs/datasets/make_compose_datasets.py   # rewrites compose_train.jsonl, compose_eval.jsonl

- compose_train.jsonl: every spec of the grammar (samplers/compose.py ``all_specs``: 30 counts,
  360 relations, 40 regions, 45 pairs) in both training templates, 950 prompts;
- compose_eval.jsonl: the 40 evaluation specs (``eval_specs``) in the held-out phrasings
  (``EVAL_PHRASINGS``, alternating), never a training wording: evaluation only.

Each row: ``prompt``, the constraints (``task``, ``counts``, ``relation``, ``region``: what the
compose reward checks) and ``template`` (train) or ``phrasing`` (eval). Nothing random but the
fixed evaluation draw, so the files are the same on every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from samplers.compose import TRAIN_TEMPLATES, all_specs, eval_specs, prompt_of, spec_metadata  # noqa: E402


def train_rows() -> list[dict]:
    return [{"prompt": prompt_of(s, t), **spec_metadata(s), "template": t}
            for s in all_specs() for t in range(len(TRAIN_TEMPLATES[s.task]))]


def eval_rows() -> list[dict]:
    return [{"prompt": prompt_of(s, i % 2, train=False), **spec_metadata(s), "phrasing": i % 2}
            for i, s in enumerate(eval_specs())]


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    write("compose_train.jsonl", train_rows())
    write("compose_eval.jsonl", eval_rows())

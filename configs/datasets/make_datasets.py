"""Writes the prompt datasets shipped beside it; every word list is this project's own.

    python configs/datasets/make_datasets.py   # rewrites the .jsonl files in this folder

- digits_train.jsonl: the digits world's training templates (samplers/digits.py TEMPLATES),
  40 prompts, metadata ``digit`` and ``template``;
- digits_eval.jsonl: the same ten digits phrased differently (never a training phrasing),
  40 prompts, metadata ``digit`` and ``phrasing``: an evaluation set the policy never trained on;
- sd3_demo.jsonl: 320 varied prompts for the SD3 configs, composed from the lists below, each
  with its parts as metadata (``subject``, ``count``, ``colour``, ``setting``, ``style``) and
  ``split`` (train or eval, 10 % eval by a fixed seed): `rollout.dataset.split: train`,
  `eval.dataset.split: eval`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from samplers.digits import DIGIT_WORDS, TEMPLATES  # noqa: E402 - after the path

EVAL_PHRASINGS = (
    "the digit {numeral} written by hand",
    "a sketch of the numeral {numeral}",
    "an ink drawing of the number {word}",
    "{word}, scribbled with a pencil",
)
SUBJECTS = ("cat", "fox", "teapot", "bicycle", "lighthouse", "owl", "sailboat", "cactus", "robot", "violin",
            "hot-air balloon", "tortoise", "umbrella", "windmill", "snail", "lantern")
COUNTS = ((1, "a"), (2, "two"), (3, "three"))
COLOURS = ("red", "blue", "golden", "green", "purple", "white")
SETTINGS = ("on a wooden table", "in a snowy forest", "on a beach at sunset", "in a busy market",
            "under a starry sky", "in a sunlit meadow", "on a city rooftop", "beside a quiet lake")
STYLES = ("a photograph", "a watercolour painting", "a pencil sketch", "a low-poly render", "an oil painting")
SD3_PROMPTS, EVAL_FRACTION, SEED = 320, 0.1, 20240601


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def digits_rows(eval_set: bool) -> list[dict]:
    rows = []
    for d, word in enumerate(DIGIT_WORDS):
        for t, template in enumerate(EVAL_PHRASINGS if eval_set else TEMPLATES):
            row = {"prompt": template.format(word=word, numeral=str(d)), "digit": d}
            row["phrasing" if eval_set else "template"] = t
            rows.append(row)
    return rows


def sd3_rows() -> list[dict]:
    rng = random.Random(SEED)
    combos = [(s, c, col, st, sty) for s in SUBJECTS for c in COUNTS for col in COLOURS for st in SETTINGS
              for sty in STYLES]
    chosen = rng.sample(combos, SD3_PROMPTS)
    held = set(rng.sample(range(SD3_PROMPTS), round(EVAL_FRACTION * SD3_PROMPTS)))
    rows = []
    for i, (subject, (n, word), colour, setting, style) in enumerate(chosen):
        article = ("an" if colour[0] in "aeiou" else "a") if n == 1 else word
        prompt = f"{style} of {article} {colour} {_plural(subject, n)} {setting}"
        rows.append({"prompt": prompt, "subject": subject, "count": n, "colour": colour, "setting": setting,
                     "style": style, "split": "eval" if i in held else "train"})
    return rows


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    write("digits_train.jsonl", digits_rows(eval_set=False))
    write("digits_eval.jsonl", digits_rows(eval_set=True))
    write("sd3_demo.jsonl", sd3_rows())

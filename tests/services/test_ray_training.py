"""A short training through real Ray actors: versions, files, the driver's checks."""

import json
import re

import numpy as np
import pytest

from services.driver import ensure_ray, split_evenly, train
from tests.services.conftest import short_config

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


def _cfg(tmp_path, small_policy, **extra):
    return short_config(tmp_path, small_policy, **{"resources.num_samplers": 2, **extra})  # every sampler syncs


def test_split_evenly():
    assert split_evenly(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_short_training_run_writes_everything(cluster, tmp_path, small_policy):
    assert ensure_ray(_cfg(tmp_path, small_policy)) is False  # joins the running cluster
    summary = train(_cfg(tmp_path, small_policy, **{"learner.rollout_refresh_every": 2}))
    run = tmp_path / "t"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == [0, 1, 2, 3]
    # H = 2: versions are published at learner steps 2 and 4; the batch of iteration i was
    # rolled out by the version the samplers held, and after each update every sampler
    # reports the version the learner published
    assert [r["rollout_version"] for r in train_rows] == [0, 0, 2, 2]
    assert [r["version"] for r in train_rows] == [0, 2, 2, 4]
    assert [r["sampler_versions"] for r in train_rows] == [[0, 0], [2, 2], [2, 2], [4, 4]]
    assert all(np.isfinite(r["loss"]) and 0 <= r["reward_mean"] <= 1 for r in train_rows)
    for name in ("samples_before_after.png", "reward_curve.png", "config.yaml", "summary.json", "summary.txt",
                 "checkpoint/policy.safetensors", "checkpoint/optimizer.safetensors", "report.html",
                 "report_curves.png"):
        assert (run / name).is_file(), name
    # the report reads offline: its four pictures (grid, reward curve, curves, the evaluations'
    # rewards and watch statistics before → after) are embedded, nothing is fetched
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and (run / "report_eval_curves.png").is_file()
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert "held-out classifier acc." in page and "algorithm:" in page
    assert summary["before"]["reward"] >= 0 and summary["after"]["diversity"] > 0
    # `fmrl eval` of the run's final checkpoint, in this process, reproduces its "after" figures
    from services.eval_cmd import evaluate_checkpoint

    ev = evaluate_checkpoint(run, out=tmp_path / "ev")
    for key in ("reward", "accuracy", "diversity"):
        assert ev[key] == pytest.approx(summary["after"][key], rel=1e-5, abs=1e-6), key
    assert ev["rewards"]["digits_classifier"] == pytest.approx(ev["reward"])
    assert (tmp_path / "ev" / "grid.png").is_file() and (tmp_path / "ev" / "eval.json").is_file()
    # a second run with the same name never overwrites the first
    with pytest.raises(FileExistsError, match="already exists"):
        train(_cfg(tmp_path, small_policy))

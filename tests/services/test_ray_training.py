"""A short training through real Ray actors: versions, files, the driver's checks."""

import json

import numpy as np
import pytest
import ray
import torch

from samplers.digits import DIGITS_TRANSFORMER_CONFIG
from samplers.policy import build_sd3_velocity, save_velocity
from services.actors import start_actors
from services.config import load_config
from services.driver import Stages, ensure_ray, split_evenly, train


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory):
    """A one-block policy of the digits shape (random weights): fast, and the real classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "p.safetensors"
    save_velocity(build_sd3_velocity(dict(DIGITS_TRANSFORMER_CONFIG, num_layers=1)), path)
    return path


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, small_policy, **extra):
    sets = [f"policy.checkpoint={small_policy}", f"run.out_dir={tmp_path}", "run.name=t", "run.iterations=4",
            "run.progress=false", "rollout.samples_per_prompt=3", "rollout.prompts_per_iteration=4",
            "eval.samples_per_prompt=2", "eval.grid_columns=2", "learner.lr=1e-3",
            "resources.sampler_cpus=0.25", "resources.learner_cpus=0.25", "resources.reward_cpus=0.25"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


def test_split_evenly():
    assert split_evenly(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_each_sampler_applies_the_learners_version(cluster, tmp_path, small_policy):
    cfg = _cfg(tmp_path, small_policy, **{"learner.rollout_refresh_every": 2})
    assert ensure_ray(cfg) is False  # joins the running cluster
    stages = Stages(*start_actors(cfg))
    prompts = cfg.rollout.prompts[:4]
    for it in range(3):
        refs = stages.rollout(prompts, 2, [it * 10 + k for k in range(4)])
        stats = ray.get(stages.learner.update.remote(stages.reward.score.remote(*refs), *refs))
        if stats["version"] != ray.get(refs[0]).version:
            stages.sync()
        learner_version = ray.get(stages.learner.publish.remote()).version
        applied = ray.get([s.version.remote() for s in stages.samplers])
        assert [v for v, _ in applied] == [learner_version] * len(stages.samplers)
        assert len({c for _, c in applied}) == 1
    assert learner_version == 2  # refreshed at step 2, not yet at 3
    for a in [*stages.samplers, stages.reward, stages.learner]:
        ray.kill(a)


def test_short_training_run_writes_everything(cluster, tmp_path, small_policy):
    summary = train(_cfg(tmp_path, small_policy))
    run = tmp_path / "t"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == [0, 1, 2, 3]
    # H = 1: the batch of iteration i was rolled out by version i, and samplers then applied i + 1
    assert [r["rollout_version"] for r in train_rows] == [0, 1, 2, 3]
    assert [r["sampler_version"] for r in train_rows] == [r["version"] for r in train_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["reward_mean"] <= 1 for r in train_rows)
    for name in ("samples_before_after.png", "reward_curve.png", "config.yaml", "summary.json", "summary.txt",
                 "checkpoint/policy.safetensors", "checkpoint/optimizer.safetensors"):
        assert (run / name).is_file(), name
    assert summary["before"]["reward"] >= 0 and summary["after"]["diversity"] > 0
    # a second run with the same name never overwrites the first
    with pytest.raises(FileExistsError, match="already exists"):
        train(_cfg(tmp_path, small_policy))

"""Shared by the training tests: a one-block digits-shaped policy, a Ray cluster, a short config."""

import pytest
import ray
import torch

from samplers.digits import DIGITS_TRANSFORMER_CONFIG
from samplers.policy import build_sd3_velocity, save_velocity
from services.config import TrainConfig, load_config


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory):
    """A one-block policy of the digits shape (random weights): fast, and the real classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "p.safetensors"
    save_velocity(build_sd3_velocity(dict(DIGITS_TRANSFORMER_CONFIG, num_layers=1)), path)
    return path


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def short_config(out_dir, policy, name="t", iterations=4, **extra) -> TrainConfig:
    """A 4-iteration digits run of the small policy, small batches, every actor on 0.25 CPU."""
    sets = [f"policy.checkpoint={policy}", f"run.out_dir={out_dir}", f"run.name={name}",
            f"run.iterations={iterations}", "run.progress=false", "rollout.samples_per_prompt=3",
            "rollout.prompts_per_iteration=4", "eval.samples_per_prompt=2", "eval.grid_columns=2", "learner.lr=1e-3",
            "resources.sampler_cpus=0.25", "resources.learner_cpus=0.25", "resources.reward_cpus=0.25",
            "metrics.port=0"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])

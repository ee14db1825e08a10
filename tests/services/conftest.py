"""Shared by the training tests: a one-block digits-shaped policy and a short config (the Ray
cluster, ``cluster``, is tests/conftest.py's)."""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch

from samplers.digits import DIGITS_TRANSFORMER_CONFIG
from samplers.policy import build_sd3_velocity, save_velocity
from services.config import TrainConfig, load_config


def write_small_policy(path: Path) -> Path:
    """The one-block policy of the digits shape ``small_policy`` is (random weights, torch seed
    0), written to ``path``; the caller's RNG is left untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_velocity(build_sd3_velocity(dict(DIGITS_TRANSFORMER_CONFIG, num_layers=1)), path)
    return path


def policy_digest(path: Path) -> str:
    """The digest a policy file records over its tensors and metadata (samplers/policy.py): equal
    digests, equal policies (the files' bytes may differ: safetensors orders metadata freely)."""
    from safetensors import safe_open

    from samplers.policy import DIGEST_KEY

    with safe_open(str(path), "pt") as f:
        return f.metadata()[DIGEST_KEY]


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory):
    """A one-block policy of the digits shape (random weights): fast, and the real classes."""
    torch.manual_seed(0)
    return write_small_policy(tmp_path_factory.mktemp("policy") / "p.safetensors")


def short_config(out_dir, policy, name="t", iterations=4, **extra) -> TrainConfig:
    """A 4-iteration digits run of the small policy, small batches, one sampler (a test of several
    asks for them: every actor start imports torch, diffusers, peft and transformers, ~5 s of
    CPU), every actor on 0.25 CPU. AC-Flow's actor is frozen through its warm-up here (the
    runs are all warm-up): these tests are about the runtime, and a frozen actor skips its
    backward pass; the default ORW warm-up is tested in tests/learner."""
    sets = [f"policy.checkpoint={policy}", f"run.out_dir={out_dir}", f"run.name={name}", "resources.num_samplers=1",
            f"run.iterations={iterations}", "run.progress=false", "rollout.samples_per_prompt=3",
            "rollout.prompts_per_iteration=4", "eval.samples_per_prompt=2", "eval.grid_columns=2", "learner.lr=1e-3",
            "resources.sampler_cpus=0.25", "resources.learner_cpus=0.25", "resources.reward_cpus=0.25",
            "metrics.port=0", "algorithm.ac_flow.warmup_actor=frozen"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


@dataclass
class TrainedRun:
    """A finished run trained once for the session (``trained_uri_run``); read it, never change it."""

    policy: Path  # the policy it started from: a resume of it names the same
    location: str  # file://<root>/remote/u
    remote: Path  # the directory at that URI: the whole run, as uploaded
    stage: Path  # FMRL_STAGING_DIR while it trained
    summary: dict  # what train() returned

    def copy_to(self, dest: Path) -> Path:
        """A copy of the run at ``dest``, for a test to change and resume."""
        shutil.copytree(self.remote, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def trained_uri_run(tmp_path_factory) -> Callable[[], TrainedRun]:
    """``trained_uri_run()``: a 3-iteration run of a one-block policy (``short_config``,
    checkpoints every 2: iter-0000002 and the final iter-0000003) trained at a file:// URI on
    the first call of the session, in the Ray cluster of the calling test (``cluster``). The
    tests that resume a finished run share it instead of each training its own: each copies it
    (``copy_to``) before changing anything."""
    made: list[TrainedRun] = []

    def get() -> TrainedRun:
        if not made:
            from services.driver import train

            assert ray.is_initialized(), "trained_uri_run() trains in the calling test's `cluster`"
            root = tmp_path_factory.mktemp("trained-run")  # a new one if an earlier try failed
            policy = write_small_policy(root / "p.safetensors")
            cfg = short_config(f"file://{root}/remote", policy, "u", iterations=3, **{"run.checkpoint_every": 2})
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FMRL_STAGING_DIR", str(root / "stage"))
                summary = train(cfg)
            made.append(TrainedRun(policy, f"file://{root}/remote/u", root / "remote" / "u", root / "stage", summary))
        return made[0]

    return get


def synchronous_config(out_dir, policy, name, **extra) -> TrainConfig:
    """``short_config`` for 6 iterations, 2 samplers, checkpoints every 2, AC-Flow's critic
    warm-up ending after step 1 (so the actor moves and every version differs): the runtime
    tests' runs, and ``reference_run``'s."""
    return short_config(out_dir, policy, name=name, iterations=6, **{
        "algorithm.ac_flow.warmup_steps": 1, "run.checkpoint_every": 2, "resources.num_samplers": 2, **extra})


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[[], tuple[Path, dict, Path]]:
    """``reference_run()``: (run directory, summary, policy) of ``synchronous_config``'s run as
    nothing disturbs it (lag 0, object-store sync), trained on the first call of the session in
    the calling test's ``cluster``: the yardstick the fault and learner-group runs must match
    (its policy is ``small_policy``'s: ``policy_digest``)."""
    made: list[tuple[Path, dict, Path]] = []

    def get() -> tuple[Path, dict, Path]:
        if not made:
            from services.driver import train

            assert ray.is_initialized(), "reference_run() trains in the calling test's `cluster`"
            root = tmp_path_factory.mktemp("reference-run")
            policy = write_small_policy(root / "p.safetensors")
            summary = train(synchronous_config(root, policy, "ref"))
            made.append((root / "ref", summary, policy))
        return made[0]

    return get

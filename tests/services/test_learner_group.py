"""A learner group through real Ray actors: two learner ranks (gloo; DDP, then FSDP2 after a
resume) train a run as one learner does, and bad group settings are refused before anything
starts."""

import json

import pytest
import ray

from services.checkpoints import latest_checkpoint
from services.config import ConfigError, load_config
from services.driver import LearnerLost, train
from services.loggers import JsonlLogger
from tests.services.conftest import policy_digest, short_config

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


# learning statistics of N = 2 against N = 1: float32 reduction order in the gradients moves the
# weights by ~1e-6 relative (tests/learner/test_group.py), which moves later rollouts and rewards
TOL = 1e-3


def _rows(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_resources_the_embedded_cluster_lacks_are_refused_before_any_actor(tmp_path, small_policy):
    # no cluster joined (the shared one, tests/conftest.py, is stopped: the next test restarts
    # it), so train() starts an embedded one of resources.ray_num_cpus
    if ray.is_initialized():
        ray.shutdown()
    cfg = short_config(tmp_path, small_policy, name="lacks", **{"resources.num_learners": 2,
                                                                "resources.num_samplers": 2, "resources.learner_gpus": 1, "resources.ray_num_cpus": 1})
    from services.actors import PlacementError

    with pytest.raises(PlacementError) as err:
        train(cfg)
    assert str(err.value) == (
        "the run asks for 1.25 CPUs (resources.num_learners=2 × learner_cpus=0.25, num_samplers=2 × sampler_cpus=0.25, "
        "reward_cpus=0.25) where this machine's cluster has 1 (resources.ray_num_cpus) and 2 GPUs "
        "(resources.num_learners=2 × learner_gpus=1, num_samplers=2 × sampler_gpus=0, reward_gpus=0) where this "
        "machine's cluster has 0")
    assert not (tmp_path / "lacks").exists()


def test_two_learner_ranks_train_as_one_survive_a_lost_rank_by_resuming(cluster, tmp_path, small_policy, monkeypatch,
                                                                       reference_run):
    # the single learner's run: conftest's reference (AC-Flow, warm-up ending after step 1),
    # of which the first two iterations are compared
    ref_dir, one, ref_policy = reference_run()
    assert policy_digest(ref_policy) == policy_digest(small_policy)
    algo = {"algorithm.name": "ac_flow", "algorithm.ac_flow.warmup_steps": 1}

    # two ranks (DDP); rank 1 is killed once iteration 0's row is written, so the checkpoint after
    # it is the last one: the next update finds the rank gone (its peer would wait in a collective)
    logged = JsonlLogger.log_iteration

    def log_then_kill(self, it, row, info):  # noqa: ANN001, ANN202 - the wrapped method's signature
        logged(self, it, row, info)
        if it == 0:
            ray.kill(ray.get_actor("fmrl-two-learner-1"))

    monkeypatch.setattr(JsonlLogger, "log_iteration", log_then_kill)
    cfg = short_config(tmp_path, small_policy, name="two", iterations=3, **algo,
                       **{"resources.num_learners": 2, "learner.micro_batch_size": 5, "run.checkpoint_every": 1})
    with pytest.raises(LearnerLost) as lost:
        train(cfg)
    monkeypatch.undo()
    ckpt = latest_checkpoint(tmp_path / "two")
    assert ckpt.name == "iter-0000001"
    assert str(lost.value).startswith("learner rank 1 died at iteration 1")
    assert str(ckpt) in str(lost.value) and f"--resume {tmp_path / 'two'}" in str(lost.value)

    # the run continues from that (unsharded) checkpoint to the second iteration, its two ranks
    # now sharding the policy with FSDP2 and rank 0 broadcasting the weights to the samplers
    # (torch_distributed), and has learnt as the single learner did
    resumed = load_config(tmp_path / "two" / "config.yaml",
                          ["run.iterations=2", "learner.sharding=fsdp", "pipeline.weight_sync=torch_distributed"])
    two = train(resumed, resume=tmp_path / "two")
    assert two["before"] == one["before"]
    a, b = _rows(ref_dir)[:2], _rows(tmp_path / "two")
    assert [r["iteration"] for r in b] == [0, 1]
    assert {r["learner_ranks"] for r in a} == {1} and {r["learner_ranks"] for r in b} == {2}
    assert b[0]["reward_mean"] == a[0]["reward_mean"]  # the same first rollouts
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "reward_mean", "critic_loss", "adv_std", "ess", "grad_norm", "version"):
            assert rb[key] == pytest.approx(ra[key], rel=TOL, abs=1e-5), (ra["iteration"], key)


@pytest.mark.parametrize(("sets", "message"), [
    (["resources.num_learners=13"], "resources.num_learners=13 exceeds the 12 rollouts of a batch"),
    (["resources.num_learners=2", "algorithm.name=orw_cfm_w2", "algorithm.orw.coupling=minibatch_ot"],
     "algorithm.orw.coupling minibatch_ot pairs noise across the whole batch"),
    (["resources.num_learners=2", "resources.learner_gpus=0.5"], "needs one whole GPU per learner"),
    (["learner.sharding=fsdp"], "learner.sharding fsdp shards the policy over a learner group: set "
                                "resources.num_learners to 2 or more"),
])
def test_bad_learner_group_settings_are_one_line_errors(tmp_path, small_policy, sets, message):
    with pytest.raises(ConfigError, match=message) as err:
        short_config(tmp_path, small_policy, **dict(s.split("=", 1) for s in sets))
    assert "\n" not in str(err.value)

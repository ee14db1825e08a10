"""A learner group through real Ray actors: two learner ranks (gloo; DDP, then FSDP2 after a
resume) train a run as one learner does, and bad group settings are refused before anything
starts."""

import json

import pytest
import ray

from services.config import ConfigError, load_config
from services.driver import train
from tests.services.conftest import short_config

# learning statistics of N = 2 against N = 1: float32 reduction order in the gradients moves the
# weights by ~1e-6 relative (tests/learner/test_group.py), which moves later rollouts and rewards
TOL = 1e-3


def _rows(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize(("sets", "message"), [
    ({"resources.learner_gpus": 1}, r"asks for 2 GPUs \(resources.num_learners=2 × learner_gpus=1, num_samplers=2"),
    ({"resources.ray_num_cpus": 1}, r"asks for 1.25 CPUs \(resources.num_learners=2 × learner_cpus=0.25, .* "
                                    r"has 1 \(resources.ray_num_cpus\)"),
])
def test_resources_the_embedded_cluster_lacks_are_refused_before_any_actor(tmp_path, small_policy, sets, message):
    # first in this module: before the shared cluster starts, so train() starts an embedded one
    cfg = short_config(tmp_path, small_policy, name="lacks", **{"resources.num_learners": 2, **sets})
    from services.actors import PlacementError

    with pytest.raises(PlacementError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "lacks").exists()


def test_two_learner_ranks_train_and_resume_as_one_learner(cluster, tmp_path, small_policy):
    algo = {"algorithm.name": "ac_flow", "algorithm.ac_flow.warmup_steps": 1}
    one = train(short_config(tmp_path, small_policy, name="one", iterations=2, **algo))
    two = train(short_config(tmp_path, small_policy, name="two", iterations=1, **algo,
                             **{"resources.num_learners": 2, "learner.micro_batch_size": 5}))
    assert two["before"] == one["before"]
    # the N = 2 run continues from its (unsharded) checkpoint to the second iteration, its two
    # ranks now sharding the policy with FSDP2
    resumed = load_config(tmp_path / "two" / "config.yaml", ["run.iterations=2", "learner.sharding=fsdp"])
    train(resumed, resume=tmp_path / "two")
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
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
    (["resources.num_learners=2", "pipeline.weight_sync=torch_distributed"],
     "pipeline.weight_sync torch_distributed is not built for a learner group yet"),
    (["resources.num_learners=2", "resources.learner_gpus=0.5"], "needs one whole GPU per learner"),
    (["learner.sharding=fsdp"], "learner.sharding fsdp shards the policy over a learner group: set "
                                "resources.num_learners to 2 or more"),
])
def test_bad_learner_group_settings_are_one_line_errors(tmp_path, small_policy, sets, message):
    with pytest.raises(ConfigError, match=message) as err:
        short_config(tmp_path, small_policy, **dict(s.split("=", 1) for s in sets))
    assert "\n" not in str(err.value)


def test_a_lost_learner_rank_stops_the_run_naming_it_and_the_last_checkpoint(cluster, tmp_path, small_policy):
    from services.checkpoints import latest_checkpoint
    from services.driver import LearnerLost
    from tests.services.test_runtime import _in_thread, _wait_for

    cfg = short_config(tmp_path, small_policy, name="lost", iterations=6,
                       **{"resources.num_learners": 2, "run.checkpoint_every": 1, "pipeline.sync_timeout_s": 60})
    thread, box = _in_thread(lambda: train(cfg))
    _wait_for(tmp_path / "lost" / "checkpoints" / "latest", thread)
    ray.kill(ray.get_actor("fmrl-lost-learner-1"))  # rank 1; its peer would wait in a collective
    thread.join(120)
    assert not thread.is_alive(), "the run did not stop when a learner rank died"
    err = box.get("error")
    assert isinstance(err, LearnerLost), err
    assert "learner rank 1 died" in str(err) and f"--resume {tmp_path / 'lost'}" in str(err)
    assert str(latest_checkpoint(tmp_path / "lost")) in str(err)

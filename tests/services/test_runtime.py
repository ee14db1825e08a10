"""The distributed runtime through real Ray actors: the lag bound, both weight-sync
backends, a sampler killed mid-run, a learner killed mid-run and the run resumed,
placement groups. The yardstick is one uninterrupted synchronous run: a run that lost a
sampler, or was stopped and resumed, must reproduce its metrics bitwise."""

import json
import threading
import time

import pytest
import ray

from services.actors import PlacementError, start_actors
from services.driver import LearnerLost, latest_checkpoint, train
from tests.services.conftest import short_config

# counters of what the pipeline redid; they differ between a faulty run and a clean one
_PIPELINE_KEYS = {"time_s", "dropped_stale", "redone_lost", "lost_reward"}


def _cfg(tmp_path, small_policy, name, **extra):
    # AC-Flow's critic warm-up ends after step 1, so the actor moves and every version differs
    return short_config(tmp_path, small_policy, name=name, iterations=6, **{
        "algorithm.ac_flow.warmup_steps": 1, "run.checkpoint_every": 2, **extra})


def _rows(run_dir, kind="train"):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == kind]


def _comparable(run_dir):
    return [{k: v for k, v in r.items() if k not in _PIPELINE_KEYS} for r in _rows(run_dir)] + \
        _rows(run_dir, "eval")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, small_policy):
    """Synchronous (lag 0), object-store sync, nothing goes wrong."""
    out = tmp_path_factory.mktemp("runs")
    summary = train(_cfg(out, small_policy, "ref"))
    return out / "ref", summary


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_for(path, thread, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert thread.is_alive() and time.time() < end, f"{path} never appeared"
        time.sleep(0.005)


def test_reference_run_is_synchronous_and_checkpointed(reference):
    run, summary = reference
    rows = _rows(run)
    assert [r["lag"] for r in rows] == [0] * 6
    # each batch was rolled out by the version the previous update published
    assert [r["rollout_version"] for r in rows] == [0] + [r["version"] for r in rows[:-1]]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["sampler_versions"] == [r["version"]] * 2 for r in rows)
    assert len({r["loss"] for r in rows}) == 6  # the policy moves, so versions matter below
    # the two newest resumable checkpoints are kept, the latest pointer names the last
    assert sorted(p.name for p in (run / "checkpoints").glob("iter-*")) == ["iter-0000004", "iter-0000006"]
    assert latest_checkpoint(run).name == "iter-0000006"
    assert summary["pipeline"] == {"dropped_stale": 0, "redone_lost": 0, "lost_reward": 0, "resyncs": 0}


@pytest.mark.parametrize("lag", [1, 2])
def test_the_lag_bound_holds_and_the_pipeline_overlaps(cluster, tmp_path, small_policy, reference, lag):
    train(_cfg(tmp_path, small_policy, f"lag{lag}", **{"pipeline.max_policy_lag": lag}))
    rows = _rows(tmp_path / f"lag{lag}")
    # the next `lag` batches roll out while the learner updates: batch i is trained on by a
    # learner exactly min(i, lag) versions ahead of the weights that rolled it out
    assert [r["lag"] for r in rows] == [min(i, lag) for i in range(6)]
    published = [0] + [r["version"] for r in rows]
    assert [r["rollout_version"] for r in rows] == [published[max(0, i - lag)] for i in range(6)]
    assert all(r["dropped_stale"] == 0 for r in rows)
    ref = _rows(reference[0])
    assert rows[2]["loss"] != ref[2]["loss"]  # stale batches really were trained on (v1 = v0: warm-up)


def test_torch_distributed_sync_with_a_sampler_killed_mid_run(cluster, tmp_path, small_policy, reference):
    cfg = _cfg(tmp_path, small_policy, "killed", **{"pipeline.weight_sync": "torch_distributed",
                                                    "pipeline.sync_timeout_s": 60})
    thread, box = _in_thread(lambda: train(cfg))
    _wait_for(tmp_path / "killed" / "eval_before.npz", thread)
    ray.kill(ray.get_actor("fmrl-killed-sampler-1"), no_restart=False)  # Ray restarts it
    thread.join(300)
    assert "error" not in box, box.get("error")
    totals = box["result"]["pipeline"]
    # the restarted sampler was resynced, and whatever it lost or rolled out with its initial
    # weights was redone: the run equals the uninterrupted one, so nothing counted twice
    assert totals["resyncs"] >= 1 and totals["redone_lost"] + totals["dropped_stale"] > 0, totals
    assert _comparable(tmp_path / "killed") == _comparable(reference[0])


def test_a_learner_failure_keeps_its_checkpoint_and_resume_is_exact(cluster, tmp_path, small_policy, reference):
    cfg = _cfg(tmp_path, small_policy, "resumed")
    thread, box = _in_thread(lambda: train(cfg))
    _wait_for(tmp_path / "resumed" / "checkpoints" / "latest", thread)
    ray.kill(ray.get_actor("fmrl-resumed-learner"))
    thread.join(300)
    err = box.get("error")
    assert isinstance(err, (LearnerLost, ray.exceptions.RayActorError)), err
    if isinstance(err, LearnerLost):
        assert "--resume" in str(err)
    ckpt = latest_checkpoint(tmp_path / "resumed")
    assert {p.name for p in ckpt.iterdir()} >= {"policy.safetensors", "optimizer.safetensors", "driver.json"}
    summary = train(cfg, resume=tmp_path / "resumed")
    # the same metrics, bitwise, as the run that was never interrupted
    assert _comparable(tmp_path / "resumed") == _comparable(reference[0])
    assert summary["after"] == reference[1]["after"]


def test_actors_are_placed_in_one_placement_group(cluster, tmp_path, small_policy):
    actors = start_actors(_cfg(tmp_path, small_policy, "placed"), "fmrl-placed")
    try:
        ray.get([actors.learner.group_address.remote(), *[s.version.remote() for s in actors.samplers]])
        table = ray.util.placement_group_table(actors.group)
        assert table["strategy"] == "PACK" and table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 0.25}] * 4  # learner, reward, 2 samplers
        # Ray accounts a bundle's resources as CPU_group_<index>_<group id>: each is fully
        # taken, i.e. every role runs inside its own bundle
        pg = actors.group.id.hex()
        free = ray.available_resources()
        assert ray.cluster_resources()[f"CPU_group_{pg}"] == 1.0
        assert [free.get(f"CPU_group_{i}_{pg}", 0.0) for i in range(4)] == [0.0] * 4
    finally:
        actors.shutdown()
    end = time.time() + 30  # the reservation is given back (asynchronously)
    while f"CPU_group_{pg}" in ray.cluster_resources():
        assert time.time() < end, "the placement group was not removed"
        time.sleep(0.1)


def test_unplaceable_roles_fail_naming_the_resource(cluster, tmp_path, small_policy):
    cfg = _cfg(tmp_path, small_policy, "nowhere", **{"resources.sampler_resources": "{inference_gpu: 1}",
                                                     "resources.placement_timeout_s": 1})
    with pytest.raises(PlacementError, match="inference_gpu"):
        start_actors(cfg, "fmrl-nowhere")

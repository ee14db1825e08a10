"""The distributed runtime through real Ray actors: the lag bound, both weight-sync
backends, a sampler killed mid-run, a learner killed mid-run and the run resumed,
placement groups. The yardstick is one uninterrupted synchronous run: a run that lost a
sampler, or was stopped and resumed, must reproduce its metrics bitwise."""

import json
import threading
import time

import pytest
import ray
import torch

from samplers.policy import state_checksum
from services.actors import PlacementError, start_actors
from services.checkpoints import latest_checkpoint
from services.driver import LearnerLost, train
from services.weight_sync import broadcast_state, group_address, join_group, receive_state
from tests.services.conftest import policy_digest, synchronous_config

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


# counters of what the pipeline redid; they differ between a faulty run and a clean one
_PIPELINE_KEYS = {"time_s", "dropped_stale", "redone_lost", "lost_reward"}


_cfg = synchronous_config


def _rows(run_dir, kind="train"):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == kind]


def _comparable(run_dir):
    # an evaluation's wall-clock seconds are not part of what it measured
    return [{k: v for k, v in r.items() if k not in _PIPELINE_KEYS} for r in _rows(run_dir)] + \
        [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(run_dir, "eval")]


@pytest.fixture(scope="module")
def reference(cluster, reference_run, small_policy):
    """Synchronous (lag 0), object-store sync, nothing goes wrong (conftest's reference_run)."""
    run, summary, policy = reference_run()
    assert policy_digest(policy) == policy_digest(small_policy)  # the runs here start where it did
    return run, summary


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
    assert summary["pipeline"] == {"dropped_stale": 0, "redone_lost": 0, "lost_reward": 0, "resyncs": 0,
                                   "broadcast_failures": 0}


@pytest.mark.parametrize("lag", [1, 2])
def test_the_lag_bound_holds_and_the_pipeline_overlaps(cluster, tmp_path, small_policy, reference, lag):
    # one sampler (one actor start fewer): the pipeline's bound is the learner's, whoever rolls out
    train(_cfg(tmp_path, small_policy, f"lag{lag}", **{"pipeline.max_policy_lag": lag, "resources.num_samplers": 1}))
    rows = _rows(tmp_path / f"lag{lag}")
    # the next `lag` batches roll out while the learner updates: batch i is trained on by a
    # learner exactly min(i, lag) versions ahead of the weights that rolled it out
    assert [r["lag"] for r in rows] == [min(i, lag) for i in range(6)]
    published = [0] + [r["version"] for r in rows]
    assert [r["rollout_version"] for r in rows] == [published[max(0, i - lag)] for i in range(6)]
    assert all(r["dropped_stale"] == 0 for r in rows)
    ref = _rows(reference[0])
    assert rows[2]["loss"] != ref[2]["loss"]  # stale batches really were trained on (v1 = v0: warm-up)


def test_torch_distributed_sync_with_a_sampler_and_the_reward_killed_mid_run(cluster, tmp_path, small_policy, reference):
    cfg = _cfg(tmp_path, small_policy, "killed", **{"pipeline.weight_sync": "torch_distributed",
                                                    "pipeline.sync_timeout_s": 30})
    thread, box = _in_thread(lambda: train(cfg))
    _wait_for(tmp_path / "killed" / "eval_before.npz", thread)
    ray.kill(ray.get_actor("fmrl-killed-sampler-1"), no_restart=False)  # Ray restarts them
    ray.kill(ray.get_actor("fmrl-killed-reward"), no_restart=False)
    thread.join(300)
    assert "error" not in box, box.get("error")
    totals = box["result"]["pipeline"]
    # the driver noticed the restarted sampler (it starts from the initial checkpoint outside the
    # broadcast group): it resynced it, or the next broadcast failed and went through the object
    # store. Which, and whether a rollout was lost, depends on when the kill lands (between two
    # rollouts none is: redone_lost and dropped_stale may be 0). Whatever it lost or rolled out
    # with its initial weights was redone: the run equals the uninterrupted one
    assert totals["resyncs"] + totals["broadcast_failures"] >= 1, totals
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
    actors = start_actors(_cfg(tmp_path, small_policy, "placed", **{"resources.num_samplers": 1}), "fmrl-placed")
    try:
        ray.get([actors.learner.group_address.remote(), *[s.version.remote() for s in actors.samplers]])
        table = ray.util.placement_group_table(actors.group)
        assert table["strategy"] == "PACK" and table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 0.25}] * 3  # learner, reward, the sampler
        # Ray accounts a bundle's resources as CPU_group_<index>_<group id>: each is fully
        # taken, i.e. every role runs inside its own bundle
        pg = actors.group.id.hex()
        free = ray.available_resources()
        assert ray.cluster_resources()[f"CPU_group_{pg}"] == 0.75
        assert [free.get(f"CPU_group_{i}_{pg}", 0.0) for i in range(3)] == [0.0] * 3
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


@ray.remote(num_cpus=0.1)
class _Member:
    """One process of a weight-sync group: rank 0 broadcasts, the others receive."""

    def address(self):
        return group_address()

    def join(self, address, port, rank, world, timeout_s):
        join_group(address, port, rank, world, timeout_s)

    def send(self, version, state):
        return broadcast_state(version, state, state_checksum(state))

    def receive(self, template):
        t0 = time.time()
        try:
            version, checksum, state = receive_state(template)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return "error", f"{type(exc).__name__}: {exc}", time.time() - t0
        return version, checksum, state_checksum(state)


def test_torch_distributed_broadcast_is_verified_and_a_missing_peer_times_out(cluster):
    members = [_Member.remote() for _ in range(3)]
    addr, port = ray.get(members[0].address.remote())
    ray.get([m.join.remote(addr, port, r, 3, 3.0) for r, m in enumerate(members)])
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(300, 7), "b.bias": torch.randn(11).to(torch.bfloat16)}
    template = {k: torch.zeros_like(v) for k, v in state.items()}
    sent = members[0].send.remote(5, state)
    got = ray.get([m.receive.remote(template) for m in members[1:]])
    assert ray.get(sent) == 300 * 7 * 4 + 11 * 2
    assert got == [(5, state_checksum(state), state_checksum(state))] * 2
    # a receiver whose policy has another shape refuses, naming it, and the group stays in step
    wrong = {"a.weight": torch.zeros(300, 6), "b.bias": template["b.bias"]}
    sent = members[0].send.remote(6, state)
    got = ray.get([members[1].receive.remote(wrong), members[2].receive.remote(template)])
    assert got[0][0] == "error" and "the learner and sampler policies differ" in got[0][1]
    assert got[1] == (6, state_checksum(state), state_checksum(state))
    # nobody broadcasts: the receivers fail after the group's 3 s timeout instead of waiting forever
    got = ray.get([m.receive.remote(template) for m in members[1:]], timeout=60)
    assert all(g[0] == "error" and 2.5 < g[2] < 30 for g in got), got
    for m in members:
        ray.kill(m)

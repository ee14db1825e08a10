"""The multi-node shape of a run on Ray's own multi-node simulator (``ray.cluster_utils.Cluster``:
several raylets on this machine): a head that runs only the driver, an inference node and a
training node advertising the custom resources deploy/ray-cluster.yaml gives those node types.
The sampler lands on the inference node and both learner ranks on the training node; losing the
inference node mid-run is survived once a replacement joins (every iteration trains once, on
its planned prompts), and fails naming the missing resource when none does.

Where an actor runs is asked of the actor itself (there is no dashboard, so no state API), from
a hook on metrics.jsonl's writer, which also removes the node at a fixed point of the run."""

import json
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from services.actors import PlacementError
from services.driver import Pipeline, batch_plan, train
from services.loggers import JsonlLogger
from tests.services.conftest import short_config

# starts Ray processes of its own: the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes

# deploy/ray-cluster.yaml's worker types, without GPUs, each holding two actors of its role (two
# CPUs: a raylet starts as many worker processes at once as its node has CPUs, up to the machine's)
INFERENCE = {"num_cpus": 2, "resources": {"inference_gpu": 2}}
TRAINING = {"num_cpus": 2, "resources": {"training_gpu": 2}}
PROMPTS = "[a handwritten zero, a handwritten one, a handwritten two, a handwritten three]"


@pytest.fixture(scope="module")
def nodes():
    """The simulated cluster, joined by this process (the driver): ``(cluster, {"inference": node,
    "training": node})``. As in the yaml the head has no CPU for actors."""
    if ray.is_initialized():  # another module's cluster
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        found = {"inference": cluster.add_node(**INFERENCE), "training": cluster.add_node(**TRAINING)}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, found
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cfg(out, policy, name, **extra):
    # the two learner ranks take the training node's CPU, so the reward actor lands on the
    # inference node (and dies with it); AC-Flow's warm-up ends after step 1, so versions differ
    return short_config(out, policy, name=name, iterations=3, **{
        "rollout.prompts": PROMPTS, "algorithm.ac_flow.warmup_steps": 1,
        "resources.sampler_resources": "{inference_gpu: 1}", "resources.learner_resources": "{training_gpu: 1}",
        "resources.num_learners": 2, "resources.learner_cpus": 1, **extra})


def _rows(run_dir, kind="train"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _nodes_of(run, roles):
    """The node each of the run's actors runs on, asked of the actor (any actor answers __ray_call__)."""
    refs = [ray.get_actor(f"fmrl-{run}-{role}").__ray_call__.remote(
        lambda self: ray.get_runtime_context().get_node_id()) for role in roles]
    return dict(zip(roles, ray.get(refs, timeout=60), strict=True))


def _after_row(mp, hook):
    """Call ``hook(iteration)`` in the driver once each train row is in metrics.jsonl."""
    original = JsonlLogger.log_iteration

    def log_iteration(self, it, row, info):
        original(self, it, row, info)
        hook(it)

    mp.setattr(JsonlLogger, "log_iteration", log_iteration)


@pytest.fixture(scope="module")
def lost_run(nodes, tmp_path_factory, small_policy):
    """A run that loses its inference node once iteration 0 is written, a replacement joining at
    once: where its actors ran (asked at rows 0 and 1) and what each learner update trained on."""
    cluster, found = nodes
    out = tmp_path_factory.mktemp("runs")
    cfg = _cfg(out, small_policy, "lost")
    where, updates = {}, []

    def hook(it):
        if it == 0:  # its sampler and the reward actor die with their node
            where["before"] = _nodes_of("lost", ["sampler-0", "reward", "learner", "learner-1"])
            where["inference"] = found["inference"].node_id
            cluster.remove_node(found.pop("inference"))
            found["inference"] = cluster.add_node(**INFERENCE)
        elif it == 1:
            where["after"] = _nodes_of("lost", ["sampler-0", "reward"])

    def update(self, b):
        updates.append((b.iteration, [x for p in b.parts for x in p.prompts], [z for p in b.parts for z in p.seeds]))
        return original(self, b)

    original = Pipeline.update
    with pytest.MonkeyPatch.context() as mp:
        _after_row(mp, hook)
        mp.setattr(Pipeline, "update", update)
        summary = train(cfg)
    return cfg, out / "lost", summary, where, updates


def test_samplers_and_learner_ranks_land_on_their_node_types(nodes, lost_run):
    # asked at iteration 0's row, before the node was lost
    _, found = nodes
    _, run, _, where, _ = lost_run
    inference, training = where["inference"], found["training"].node_id
    assert where["before"] == {"sampler-0": inference, "reward": inference, "learner": training, "learner-1": training}
    rows = _rows(run)
    assert [r["learner_ranks"] for r in rows] == [2, 2, 2]


def test_losing_the_inference_node_is_survived_once_a_replacement_joins(nodes, lost_run):
    _, found = nodes
    cfg, run, summary, where, updates = lost_run
    # Ray placed the lost bundles on the replacement and restarted the actors there
    assert set(where["after"].values()) == {found["inference"].node_id} != {where["inference"]}
    rows = _rows(run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # the sampler's rollouts of iteration 1 (4 prompts × 3 samples) were lost and redone, once,
    # after the restarted sampler was resynced
    assert [r["redone_lost"] for r in rows] == [0, 12, 0]
    assert [r["dropped_stale"] for r in rows] == [0, 0, 0]
    assert summary["pipeline"]["resyncs"] == 1
    # every iteration trained once, on its planned prompts and seeds, rolled out by the version
    # published just before it (lag 0): nothing lost, doubled or rolled out by stale weights
    assert updates == [(it, *batch_plan(cfg, it)) for it in range(3)]
    assert [r["lag"] for r in rows] == [0, 0, 0]
    assert [r["rollout_version"] for r in rows] == [0] + [r["version"] for r in rows[:-1]]
    assert len({r["loss"] for r in rows}) == 3  # the policy moves: a stale sampler would show
    assert {r["when"] for r in _rows(run, "eval")} == {"before", "after"}


def test_losing_the_inference_node_with_no_replacement_fails_naming_it(nodes, tmp_path, small_policy):
    # one learner: fewer processes to start, the same lost bundle
    cluster, found = nodes
    timeout = 3
    removed = []

    def hook(it):
        if it == 0:
            cluster.remove_node(found.pop("inference"))
            removed.append(time.monotonic())

    try:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(PlacementError) as err:
            _after_row(mp, hook)
            train(_cfg(tmp_path, small_policy, "gone", **{"resources.placement_timeout_s": timeout,
                                                          "resources.num_learners": 1}))
        waited = time.monotonic() - removed[0]
    finally:  # the module's cluster keeps its shape
        if "inference" not in found:
            found["inference"] = cluster.add_node(**INFERENCE)
    message = str(err.value)
    assert "\n" not in message and "inference_gpu" in message and "placement_timeout_s" in message, message
    # the restart's placement is given up after the timeout, not the restart's own patience (120 s)
    assert timeout < waited < timeout + 30, waited

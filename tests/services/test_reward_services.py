"""Training with the reward served by `fmrl reward-worker` processes over Redis Streams.

The same seeds through the in-cluster reward actor and through Redis services give the
same rewards; a service replaced by a new process during a run loses no batch.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from reward_workers.client import RewardUnavailable
from services.cli import _cause
from services.driver import train
from tests.conftest import free_port, scrape_metrics, terminate
from tests.services.conftest import short_config

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 4
# the actor must move (warm-up of one step), so the rewards of later iterations depend on
# every earlier reward having reached the learner intact
LEARNING = {"algorithm.ac_flow.warmup_steps": 1}


def start_worker(url: str, log_dir: Path, consumer: str, metrics_port: int | None = None,
                 reward: tuple[str, ...] = ("--reward", "digits_classifier")) -> subprocess.Popen:
    """A real `fmrl reward-worker` process (one torch thread, as the reward actor uses)."""
    cmd = [sys.executable, "-m", "services.cli", "reward-worker", *reward,
           "--redis-url", url, "--consumer", consumer, "--claim-idle-s", "2", "--block-ms", "200"]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = open(log_dir / f"{consumer}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_consuming(url: str, consumer: str, timeout: float = 60.0) -> None:
    """Until the worker is blocked reading its stream (Redis 7.0 lists a blocked consumer in
    CLIENT LIST, under the name the service gives its connection, before XINFO CONSUMERS)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c["name"] == f"fmrl-reward-{consumer}" and c["cmd"] == "xreadgroup" for c in r.client_list()):
            return
        time.sleep(0.1)
    raise AssertionError(f"reward worker {consumer} did not start reading its stream within {timeout} s")


def served_requests(port: int) -> float:
    family = scrape_metrics(port).get("fmrl_reward_service_requests")
    return sum(s.value for s in (family.samples if family else [])
               if s.name.endswith("_total") and s.labels.get("outcome") == "ok")


def redis_reward(url: str) -> dict[str, str]:
    return {"reward.components": "[{kind: digits_classifier, transport: redis, "
                                 f"redis: {{url: '{url}', timeout_s: 5, attempts: 20, encoding: png}}}}]"}


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train_rewards(run: Path) -> np.ndarray:
    return np.array([[r["reward_mean"], r["reward/digits_classifier"]] for r in rows(run) if r["kind"] == "train"])


@pytest.fixture(scope="module")
def in_cluster(cluster, small_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    summary = train(short_config(out, small_policy, name="ray", iterations=ITERATIONS, **LEARNING))
    return out / "ray", summary


def test_redis_rewards_equal_in_cluster_and_a_replaced_service_loses_no_batch(in_cluster, small_policy, redis_url,
                                                                               tmp_path):
    """The run's reward comes from `fmrl reward-worker` processes; the first is replaced by a
    new process after two iterations. The rewards equal the in-cluster run's all along."""
    ports = [free_port(), free_port()]
    first = start_worker(redis_url, tmp_path, "first", ports[0])
    wait_consuming(redis_url, "first")
    replaced = threading.Event()
    second: list[subprocess.Popen] = []

    def replace() -> None:
        """After two iterations: SIGTERM the first service (it finishes its batch and exits 0),
        leave the stream unserved a moment, then start a new process."""
        metrics = tmp_path / "redis" / "metrics.jsonl"
        while not (metrics.is_file() and sum('"train"' in x for x in metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        time.sleep(1.0)
        second.append(start_worker(redis_url, tmp_path, "second", ports[1]))
        replaced.set()

    t = threading.Thread(target=replace, daemon=True)
    t.start()
    try:
        summary = train(short_config(tmp_path, small_policy, name="redis", iterations=ITERATIONS, **LEARNING,
                                     **redis_reward(redis_url)))
        t.join(60)
        assert replaced.is_set() and first.returncode == 0
        # the new process served the rest of the run (at least the closing evaluation)
        assert served_requests(ports[1]) >= 1
    finally:
        for p in [first, *second]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    ref_run, ref = in_cluster
    got = train_rewards(tmp_path / "redis")
    assert got.shape == (ITERATIONS, 2)
    # PNG on the wire is lossless and the model runs on one thread on both paths: the
    # rewards agree to float64 round-off, iteration by iteration (so every update did too)
    np.testing.assert_allclose(got, train_rewards(ref_run), rtol=1e-9, atol=0)
    for phase in ("before", "after"):
        assert summary[phase]["reward"] == pytest.approx(ref[phase]["reward"], rel=1e-9)
        assert summary[phase]["diversity"] == pytest.approx(ref[phase]["diversity"], rel=1e-9)
    # every request was answered and consumed: nothing is left pending in the group
    r = redis.Redis.from_url(redis_url)
    assert r.xpending("fmrl:reward:digits_classifier:requests", "fmrl-reward-digits_classifier")["pending"] == 0
    assert r.xlen("fmrl:reward:digits_classifier:dead") == 0


def test_optional_service_missing_the_run_goes_on_required_missing_it_stops(cluster, small_policy, redis_url, tmp_path):
    """No worker serves the CLIP stream: optional, each batch is trained on the digits reward
    alone (and flagged); required, the run stops with an error naming the reward."""
    clip = f"{{kind: clip, transport: redis, redis: {{url: '{redis_url}', timeout_s: 0.3, attempts: 1}}"
    train(short_config(tmp_path, small_policy, name="optional", iterations=2,
                       **{"reward.components": f"[{{kind: digits_classifier}}, {clip}, required: false}}]"}))
    got = [r for r in rows(tmp_path / "optional") if r["kind"] == "train"]
    assert [(r["reward_available/clip"], r["reward_available/digits_classifier"]) for r in got] == [(0.0, 1.0)] * 2
    # reward_mean is the float32 mean the learner saw, reward/<name> the float64 one
    assert all("reward/clip" not in r and r["reward_mean"] == pytest.approx(r["reward/digits_classifier"], rel=1e-6)
               for r in got)

    with pytest.raises(Exception) as info:
        train(short_config(tmp_path, small_policy, name="required", iterations=2,
                           **{"reward.components": f"[{{kind: digits_classifier}}, {clip}}}]"}))
    cause = _cause(info.value)
    assert isinstance(cause, RewardUnavailable)
    assert "'clip'" in str(cause) and "fmrl:reward:clip:requests" in str(cause)


def test_digits_trains_three_iterations_on_the_example_python_reward(cluster, small_policy, redis_url, tmp_path):
    """A user's reward (kind python, the shipped example) in the cluster's reward actor, weighted
    with a built-in one, and the same callable served by a real `fmrl reward-worker --reward
    python` process over Redis (weight 0: scored, not trained on), which must score every batch
    exactly as the in-cluster one; here, in this module, to share its Ray cluster."""
    example = "reward_workers.examples:stroke_contrast"
    worker = start_worker(redis_url, tmp_path, "py-svc", reward=("--reward", "python", "--callable", example))
    try:
        wait_consuming(redis_url, "py-svc")
        components = (f"[{{kind: python, name: contrast, weight: 0.5, callable: '{example}'}}, "
                      f"{{kind: python, name: contrast_svc, weight: 0, callable: '{example}', transport: redis, "
                      f"redis: {{url: '{redis_url}', timeout_s: 5, attempts: 20}}}}, {{kind: digits_classifier}}]")
        train(short_config(tmp_path, small_policy, name="py", iterations=3, **LEARNING,
                           **{"reward.components": components}))
    finally:
        terminate(worker, 30)
    train_rows = [r for r in rows(tmp_path / "py") if r["kind"] == "train"]
    assert len(train_rows) == 3
    for r in train_rows:
        assert r["reward_available/contrast"] == 1.0 and 0.0 <= r["reward/contrast"] <= 1.0
        assert r["reward_available/contrast_svc"] == 1.0
        assert r["reward/contrast_svc"] == pytest.approx(r["reward/contrast"], rel=1e-9)  # same images, same code
        # the trained reward is the weighted sum of the components' batch means (float32 mean)
        assert r["reward_mean"] == pytest.approx(0.5 * r["reward/contrast"] + r["reward/digits_classifier"], rel=1e-6)

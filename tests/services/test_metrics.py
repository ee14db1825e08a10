"""The training job's /metrics, scraped while a short run trains: every declared metric is
exposed with its declared type and the counters move; a real Prometheus scrapes the run and
Ray's metrics agent, evaluates the alert rules and answers every dashboard query; dashboards
and alerts use declared names only."""

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.driver import train
from services.evaluation import Evaluation
from telemetry.metrics import METRICS, exposed
from tests.conftest import RAY_TEST_CLUSTER, free_port, scrape_metrics, start_prometheus
from tests.services.conftest import short_config

# starts Ray processes of its own: the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REMOTE_REWARDS = ("reward_service", "reward_client")  # only runs with Redis reward services have these


@pytest.fixture(scope="module")
def metrics_cluster():
    # not the shared `cluster` (tests/conftest.py): actors' metrics reach Ray's agent every
    # second (default 10 s), so a short run shows them
    ray.init(**RAY_TEST_CLUSTER, _system_config={"metrics_report_interval_ms": 1000})
    yield
    ray.shutdown()


def _ray_metrics_port() -> int:
    return int(ray.nodes()[0]["MetricsExportPort"])


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads((DEPLOY / "grafana" / "fmrl-dashboard.json").read_text())["panels"]
            for t in p["targets"]]


def _value(families, name, **labels):
    """The sum of the samples called ``name`` (a counter's _total, a histogram's _count …)."""
    fam = next(f for f in families.values() if any(s.name == name for s in f.samples))
    return sum(s.value for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_served_with_their_declared_types_and_counters_move(metrics_cluster, tmp_path, small_policy):
    port = free_port()
    # 60 iterations (~10 s): Ray's agent and Prometheus each add a second's delay, and a rate()
    # needs two scrapes of a series the learner's first update creates
    # evaluations between batches after 20 and 40 iterations, scored also by a reward the run
    # does not train on (JPEG compressibility) beside the held-out classifier
    unseen = '[{"kind": "digits_classifier"}, {"kind": "jpeg_compressibility"}]'
    cfg = short_config(tmp_path / "runs", small_policy, name="m", iterations=60,
                       **{"metrics.port": port, "eval.every": 20, "eval.rewards": unseen, "resources.num_samplers": 2})
    # deploy/'s own config and alerts, scraping every second; it finds the run (its driver and,
    # with no Ray dashboard here, Ray's metrics agent) from runs/prometheus/m.json
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    conf = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    conf["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    conf["scrape_configs"] = [c for c in conf["scrape_configs"] if c["job_name"] == "fmrl-runs"]
    (deploy / "prometheus.yml").write_text(yaml.safe_dump(conf))
    shutil.copy(DEPLOY / "prometheus-alerts.yml", deploy)
    prom = start_prometheus(tmp_path / "prometheus", config_file=deploy / "prometheus.yml")
    try:
        t0 = time.time()
        first, second = _train_and_scrape(cfg, port)
        _check_scrapes(first, second)
        p, n = Evaluation.load(tmp_path / "runs" / "m" / "eval_before.npz").images.shape[:2]
        _check_evaluations(tmp_path / "runs" / "m")
        # What reaches Prometheus goes through Ray's agent (reports every second) and a scrape
        # (every second); on a loaded machine either can lag the run's end by seconds. Wait for
        # the checks to hold over [t0, now] (deadline 60 s) instead of betting on a fixed sleep:
        # the series a run produced never disappear, and the empty ones stay empty.
        eventually(lambda: _check_prometheus(prom, t0, time.time(), run_images=60 * 12 + 4 * p * n), 60)
    finally:
        prom.stop()
    assert not (tmp_path / "runs" / "prometheus" / "m.json").exists()  # Prometheus forgets the run


def _check_evaluations(run_dir):
    """Evaluation rows before, after 20 and 40 iterations, and after; each with the unseen reward,
    the held-out accuracy and the watch (drift from the 'before' base); the report draws them."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["when"], r["iteration"]) for r in evals] == [("before", 0), ("iteration", 20), ("iteration", 40),
                                                           ("after", 60)]
    for r in evals:
        assert {"eval_reward/digits_classifier", "eval_reward/jpeg_compressibility", "eval_reward/heldout_svm",
                "watch/brightness", "watch/jpeg_bytes", "seconds"} <= set(r), r
        assert ("drift/brightness" in r) == (r["when"] != "before")
    # each evaluation sits right after the row of the iteration it follows
    kinds = [(r["kind"], r["iteration"]) for r in rows]
    assert kinds.index(("eval", 20)) == kinds.index(("train", 19)) + 1
    assert "Evaluations during training" in (run_dir / "report.html").read_text()


def eventually(check, timeout_s):
    """Call ``check`` until it stops raising AssertionError; after ``timeout_s`` re-raise its error."""
    end = time.time() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.time() > end:
                raise
            time.sleep(1.0)


def _train_and_scrape(cfg, port):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", train(cfg)), daemon=True)
    thread.start()
    scrapes = []
    end = time.time() + 240
    while thread.is_alive() and time.time() < end and len(scrapes) < 2:
        try:
            fams = scrape_metrics(port)
        except OSError:  # not serving yet
            time.sleep(0.02)
            continue
        its = _value(fams, "fmrl_iterations_total")
        if (not scrapes and its >= 1) or (scrapes and its >= _value(scrapes[0], "fmrl_iterations_total") + 2):
            scrapes.append(fams)
        time.sleep(0.02)
    thread.join(240)
    assert "summary" in box and len(scrapes) == 2, (len(scrapes), box)
    return scrapes


def _check_scrapes(first, second):
    training = [m for m in METRICS if m.scope == "training"]
    for m in training:
        family, kind = exposed(m)
        assert family in second, f"{m.name} is not exposed"
        assert second[family].type == kind, (m.name, second[family].type)
    for name, labels in (("fmrl_iterations_total", {}), ("fmrl_learner_steps_total", {}),
                         ("fmrl_rollout_images_total", {"purpose": "train"})):
        assert _value(second, name, **labels) > _value(first, name, **labels) > 0, name
    # 4 prompts × 3 samples per iteration; the lag-0 pipeline never lags or drops
    assert _value(second, "fmrl_rollout_images_total", purpose="train") == 12 * _value(second, "fmrl_iterations_total")
    assert _value(second, "fmrl_policy_lag_versions_count") == _value(second, "fmrl_iterations_total")
    assert _value(second, "fmrl_policy_lag_versions_sum") == 0
    assert _value(second, "fmrl_policy_version", role="learner") == _value(second, "fmrl_iteration") + 1
    assert _value(second, "fmrl_weight_sync_bytes_total", backend="object_store") > 0
    assert 0 <= _value(second, "fmrl_idle_ratio", role="learner") <= 1
    build = second["fmrl_build_info"].samples[0]
    assert build.labels["ray"] and build.labels["torch"]


def labels_of(prom, expr, t0, t1, key):
    return {s["metric"].get(key) for s in prom.query_range(expr, t0, t1)}


def _check_prometheus(prom, t0, t1, run_images):
    """What Prometheus made of the run: every dashboard query has data (those of the Redis
    reward services excepted: this run scores in its reward actor), every alert rule
    evaluates, and what the actors recorded through Ray's metrics arrived."""
    for expr in _dashboard_exprs():
        remote = all(m.scope in REMOTE_REWARDS for m in _metrics_in(expr))
        # what Grafana makes of $__rate_interval at 1 s scrapes and steps: max(step + 1 s, 4 × 1 s)
        result = prom.query_range(expr.replace("$__rate_interval", "4s"), t0, t1)
        assert bool(result) != remote, f"{expr!r}: {len(result)} series"
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"FmrlDiversityCollapse", "FmrlPipelineStalled", "FmrlRolloutsDropped",
                                          "FmrlRewardHacking"}
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r
    firing = prom.api("alerts")["alerts"]
    assert not [a for a in firing if a["state"] == "firing"], firing

    # the driver waited for a last scrape: Prometheus has the final evaluation (it came in the
    # run's last second, and the series went stale with the server: read its last sample)
    after = prom.api("query", query='last_over_time(fmrl_eval_reward{when="after"}[5m])', time=time.time())
    assert [r["metric"]["when"] for r in after["result"]] == ["after"], after

    def labels(expr, key):
        return labels_of(prom, expr, t0, t1, key)

    assert labels('up{run="m"} == 1', "job") == {"fmrl-training", "ray"}  # both found through the run's file

    for m in METRICS:
        if m.scope == "ray_actor":
            sample = m.series + ("_count" if m.kind == "histogram" else "")
            assert prom.query_range(sample, t0, t1), f"{m.series} never reached Prometheus"
    assert labels("ray_fmrl_actor_busy_seconds_total", "role") == {"sampler", "learner", "reward"}
    assert labels("ray_fmrl_learner_step_phase_seconds_count", "phase") == {"prepare", "forward_backward",
                                                                             "optimizer"}
    assert labels("ray_fmrl_reward_score_seconds_count", "reward") == {"digits_classifier", "jpeg_compressibility"}
    assert labels('fmrl_eval_score{when="iteration"}', "reward") == {"digits_classifier", "jpeg_compressibility",
                                                                    "heldout_svm"}
    assert "brightness" in labels("fmrl_eval_drift_ratio", "stat")
    # two samplers, each its own series (Ray's WorkerId); what they rolled out adds up to at
    # most the run's images (Ray reports each second: the last report may come after the
    # actors are gone) — the exact counts are the next test's
    assert len(labels("ray_fmrl_sampler_rollout_images_total", "WorkerId")) == 2
    ray_images = prom.api("query", query="sum(max_over_time(ray_fmrl_sampler_rollout_images_total[10m]))",
                          time=t1)["result"]
    assert 0 < float(ray_images[0]["value"][1]) <= run_images


def test_docs_define_every_declared_metric():
    from pathlib import Path

    from telemetry.metrics import markdown_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    table = doc[doc.index("<!-- metrics-table:begin -->") + 29:doc.index("<!-- metrics-table:end -->")].strip()
    assert table == markdown_table(), "docs/metrics.md is stale: paste telemetry.metrics.markdown_table() into it"


def _series_names():
    """Every sample name a scrape of the declared metrics can show, and its metric."""
    out = {}
    for m in METRICS:
        for suffix in ("_bucket", "_sum", "_count") if m.kind == "histogram" else ("",):
            out[m.series + suffix] = m
    return out


def _names_in(expr):
    return set(re.findall(r"\b(?:ray_)?fmrl_[a-z0-9_]+", expr))


def _metrics_in(expr):
    series = _series_names()
    return {series[n] for n in _names_in(expr)}


def test_dashboard_and_alerts_query_only_declared_metrics():
    exprs = _dashboard_exprs()
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    rules = [r for f in prom["rule_files"] for g in yaml.safe_load((DEPLOY / f).read_text())["groups"]
             for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"FmrlDiversityCollapse", "FmrlPipelineStalled"}
    exprs += [r["expr"] for r in rules]
    declared = set(_series_names())
    used = set()
    for e in exprs:
        names = _names_in(e)
        assert names, f"query names no fmrl metric: {e}"
        assert names <= declared, f"undeclared in {e!r}: {sorted(names - declared)}"
        used |= names
    # the dashboard covers the training metrics users watch first
    assert {"fmrl_reward_mean", "fmrl_batch_diversity", "fmrl_policy_version", "fmrl_w2_bound",
            "fmrl_trajectories_dropped_total", "fmrl_weight_sync_bytes_total"} <= used


def test_declarations_follow_prometheus_naming():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"fmrl_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert (m.kind == "histogram") == (m.buckets is not None), m.name
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets)
        if m.unit == "seconds":
            assert m.name.removesuffix("_total").endswith("_seconds"), m.name
        # no high-cardinality labels: never ids, prompts, versions or free text
        assert not set(m.labels) & {"id", "prompt", "version", "run", "request", "image", "step"}, m.name
        assert m.help.strip(), m.name
        if m.scope == "ray_actor":  # Ray takes ASCII descriptions only
            assert m.help.isascii(), m.name


def test_reward_client_metrics_from_the_reward_actor_are_served_by_the_driver():
    from prometheus_client import generate_latest

    from reward_workers import metrics as rm
    from services.observe import RunMetrics

    rm.CLIENT_REQUEST_SECONDS.labels("clip").observe(0.2)
    rm.CLIENT_REQUEST_SECONDS.labels("clip").observe(3.0)
    rm.CLIENT_ERRORS.labels("clip", "timeout").inc()
    families = rm.client_metric_families()  # what the reward actor hands back with its scores
    run = RunMetrics(None)
    run.reward_clients(families)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(run.registry).decode())}
    for m in METRICS:
        if m.scope == "reward_client":
            family, kind = exposed(m)
            assert fams[family].type == kind, m.name
    assert _value(fams, "fmrl_reward_client_request_seconds_count", reward="clip") >= 2
    assert _value(fams, "fmrl_reward_client_request_seconds_bucket", reward="clip", le="0.25") >= 1
    assert _value(fams, "fmrl_reward_client_errors_total", reward="clip", kind="timeout") >= 1


def _worker_samples(port, worker_id):
    """The ray_fmrl_* samples Ray's agent serves for one worker: {(name, labels…): value}."""
    out = {}
    for fam in scrape_metrics(port).values():
        for s in fam.samples:
            if s.name.startswith("ray_fmrl_") and s.labels.get("WorkerId") == worker_id:
                extra = tuple(sorted((k, v) for k, v in s.labels.items() if k in ("role", "backend", "le")))
                out[(s.name, *extra)] = s.value
    return out


def test_a_sampler_actor_records_its_work_through_rays_metrics(metrics_cluster, tmp_path, small_policy):
    """Exact counts from one sampler actor: 3 rollouts of 2 prompts × 3 samples, one apply."""
    from samplers.policy import published_state, state_checksum
    from services.actors import SamplerWorker
    from services.weight_sync import WirePayload
    from services.world import build_sampler

    cfg = short_config(tmp_path, small_policy)
    actor = ray.remote(SamplerWorker).options(num_cpus=0.25).remote(cfg)
    worker_id = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_worker_id()))
    prompts = ["a handwritten zero", "a handwritten one"]
    for i in range(3):
        ray.get(actor.rollout.remote(prompts, 3, [i, i + 10])[1])
    state = published_state(build_sampler(cfg).velocity)
    assert ray.get(actor.apply_weights.remote(WirePayload.from_state(7, state, state_checksum(state))))[0] == 7
    want = {("ray_fmrl_sampler_rollout_images_total",): 18.0, ("ray_fmrl_sampler_rollout_seconds_count",): 3.0,
            ("ray_fmrl_sampler_weight_apply_seconds_count", ("backend", "object_store")): 1.0,
            ("ray_fmrl_sampler_policy_version",): 7.0}
    deadline = time.time() + 30
    while time.time() < deadline:  # Ray's agent reports every second here
        got = _worker_samples(_ray_metrics_port(), worker_id)
        if all(got.get(k) == v for k, v in want.items()):
            break
        time.sleep(0.5)
    assert all(got.get(k) == v for k, v in want.items()), (want, got)
    # the busy counter is exact (the histogram sums are Ray's bucket midpoints): it holds the
    # three rollouts and the apply, each of which lies inside its histogram bucket
    busy = got[("ray_fmrl_actor_busy_seconds_total", ("role", "sampler"))]
    buckets = sorted((float(k[1][1]), v) for k, v in got.items()
                     if k[0] == "ray_fmrl_sampler_rollout_seconds_bucket" and k[1][1] != "+Inf")
    first_full = next(le for le, count in buckets if count == 3)  # every rollout took at most this
    assert 0 < busy
    assert busy <= first_full * 3 + 60  # three rollouts at most first_full each, plus the apply (< 1 min)
    ray.kill(actor)


def test_the_run_waits_for_a_last_scrape_only_when_something_scrapes_it():
    from services.observe import RunMetrics

    run = RunMetrics(0)
    try:
        assert run.wait_for_scrape(30) is False  # nobody has scraped: no wait at all
        scrape_metrics(run.port)
        assert run.wait_for_scrape(0.2) is False  # scraped before, but no scrape came in time
        timer = threading.Timer(0.3, scrape_metrics, args=(run.port,))
        timer.start()
        assert run.wait_for_scrape(30) is True  # the next scrape ends the wait
        timer.join()
        assert run.wait_for_scrape(0) is False  # 0: never wait
    finally:
        run.close()


def test_the_reward_service_panels_answer_from_a_live_service(redis_url, tmp_path):
    """The dashboard's Redis panels (which the training-run test expects empty) against a real
    Prometheus scraping a reward service and its client: each of their queries has data."""
    from prometheus_client import start_http_server

    from reward_workers.client import RewardClient, connect
    from reward_workers.digits import DIGIT_WORDS, DigitsClassifierReward, load_split
    from reward_workers.service import RewardService, ServiceConfig

    split = load_split()
    images = split.heldout_images[:8, ..., None]
    prompts = [f"a handwritten {DIGIT_WORDS[y]}" for y in split.heldout_labels[:8]]
    # service and client share this process's default registry, as a service's --metrics-port does
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1")
    service = RewardService(DigitsClassifierReward(), connect(redis_url),
                            ServiceConfig(reward="digits_classifier", block_ms=100, consumer="panel"))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    prom = start_prometheus(tmp_path / "prometheus", {"fmrl-reward-services": [f"127.0.0.1:{port}"]})
    try:
        prom.wait_scraped()
        t0 = time.time()
        with RewardClient(redis_url, "digits_classifier", max_images_per_request=2, timeout_s=30) as client:
            while time.time() < t0 + 6:  # requests across several scrapes
                client.score(images, prompts)
                time.sleep(0.2)
        remote = [e for e in _dashboard_exprs() if all(m.scope in REMOTE_REWARDS for m in _metrics_in(e))]
        assert len(remote) == 6, remote

        def check():  # over [t0, now]: waits out a late scrape on a loaded machine
            for expr in remote:
                result = prom.query_range(expr.replace("$__rate_interval", "4s"), t0, time.time())
                assert result, expr
                # (a p95 is NaN at steps whose window saw no request)
                peak = max((float(v) for s in result for _, v in s["values"] if v != "NaN"), default=0.0)
                if "requests_total" in expr or "request_seconds" in expr:
                    assert peak > 0, expr  # requests flowed and took time
                elif "errors_total" in expr:
                    assert peak == 0, expr  # and none failed

        eventually(check, 60)
    finally:
        prom.stop()
        service.stop_event.set()
        thread.join(10)
        server.shutdown()
        server.server_close()

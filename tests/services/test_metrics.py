"""The training job's /metrics, scraped while a short run trains: every declared metric is
exposed with its declared type and the counters move; dashboards use declared names only."""

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from services.driver import train
from telemetry.metrics import METRICS, exposed
from tests.conftest import free_port
from tests.services.conftest import short_config


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    return families


def _value(families, name, **labels):
    """The sum of the samples called ``name`` (a counter's _total, a histogram's _count …)."""
    fam = next(f for f in families.values() if any(s.name == name for s in f.samples))
    return sum(s.value for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_served_with_their_declared_types_and_counters_move(cluster, tmp_path, small_policy):
    port = free_port()
    cfg = short_config(tmp_path, small_policy, name="m", iterations=20, **{"metrics.port": port})
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", train(cfg)), daemon=True)
    thread.start()
    scrapes = []
    end = time.time() + 240
    while thread.is_alive() and time.time() < end and len(scrapes) < 2:
        try:
            fams = _scrape(port)
        except OSError:  # not serving yet
            time.sleep(0.02)
            continue
        its = _value(fams, "fmrl_iterations_total")
        if (not scrapes and its >= 1) or (scrapes and its >= _value(scrapes[0], "fmrl_iterations_total") + 2):
            scrapes.append(fams)
        time.sleep(0.02)
    thread.join(240)
    assert "summary" in box and len(scrapes) == 2, (len(scrapes), box)
    first, second = scrapes
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


def test_docs_define_every_declared_metric():
    from pathlib import Path

    from telemetry.metrics import markdown_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    table = doc[doc.index("<!-- metrics-table:begin -->") + 29:doc.index("<!-- metrics-table:end -->")].strip()
    assert table == markdown_table(), "docs/metrics.md is stale: paste telemetry.metrics.markdown_table() into it"


def _series_names():
    """Every sample name a scrape of the declared metrics can show."""
    out = set()
    for m in METRICS:
        if m.kind == "histogram":
            out |= {m.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            out.add(m.name)
    return out


def test_dashboard_and_alerts_query_only_declared_metrics():
    import json
    import re
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    exprs = [t["expr"] for p in json.loads((deploy / "grafana" / "fmrl-dashboard.json").read_text())["panels"]
             for t in p["targets"]]
    prom = yaml.safe_load((deploy / "prometheus.yml").read_text())
    rules = [r for f in prom["rule_files"] for g in yaml.safe_load((deploy / f).read_text())["groups"]
             for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"FmrlDiversityCollapse", "FmrlPipelineStalled"}
    exprs += [r["expr"] for r in rules]
    declared = _series_names()
    used = set()
    for e in exprs:
        names = set(re.findall(r"\bfmrl_[a-z0-9_]+", e))
        assert names, f"query names no fmrl metric: {e}"
        assert names <= declared, f"undeclared in {e!r}: {sorted(names - declared)}"
        used |= names
    # the dashboard covers the training metrics users watch first
    assert {"fmrl_reward_mean", "fmrl_batch_diversity", "fmrl_policy_version", "fmrl_w2_bound",
            "fmrl_trajectories_dropped_total", "fmrl_weight_sync_bytes_total"} <= used


def test_declarations_follow_prometheus_naming():
    import re

    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"fmrl_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert (m.kind == "histogram") == (m.buckets is not None), m.name
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets)
        if m.unit == "seconds":
            assert m.name.endswith("_seconds"), m.name
        # no high-cardinality labels: never ids, prompts, versions or free text
        assert not set(m.labels) & {"id", "prompt", "version", "run", "request", "image", "step"}, m.name
        assert m.help.strip(), m.name


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

"""The training job's Prometheus metrics: recorded by the driver, served on /metrics.

Every name is declared in telemetry/metrics.py. The driver records what it sees each
iteration (the learner's statistics, the pipeline's counters, its own timings) and serves
them from its process with prometheus-client on ``metrics.host:metrics.port``
(127.0.0.1 by default: put a reverse proxy or Prometheus on the same node in front of it).

While it runs, a run also writes ``<out_dir>/prometheus/<run>.json``, a Prometheus
file_sd target list naming its /metrics and (unless the Ray head's dashboard already writes
its own discovery file) every Ray node's metrics agent, where the actors' ``ray_fmrl_*``
metrics are served; deploy/prometheus.yml reads ``runs/prometheus/*.json``, so Prometheus
finds each run, whatever port it took, and forgets it when the file is removed at its end.
"""

from __future__ import annotations

import json
import os
import platform
import threading
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from services.evaluation import Evaluation
from telemetry.metrics import training_registry


class _Mirror:
    """Serves the latest metric families reported by another process (the reward actor's
    Redis clients) as they are: cumulative values, declared names."""

    def __init__(self) -> None:
        self.families: list = []

    def collect(self):  # noqa: ANN201 - the prometheus-client collector protocol
        return iter(self.families)


class _Scrapes:
    """Counts the scrapes of a registry (it is collected once per scrape)."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def describe(self):  # noqa: ANN201 - no metrics of its own
        return iter(())

    def collect(self):  # noqa: ANN201
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return iter(())


class RunMetrics:
    """The training metrics of one run, and (when a port is given) their HTTP server."""

    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        self.registry, self.m = training_registry()
        self._server = None
        self._resyncs = 0
        self._clients = _Mirror()
        self.registry.register(self._clients)
        self._scrapes = _Scrapes()
        self.registry.register(self._scrapes)
        self._diversity0: float | None = None
        if port is not None:
            try:
                self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {host}:{port} ({exc.strerror}): another run or "
                              "program holds the port; set metrics.port to a free one (or null to serve none)") from None
        self.port = self._server.server_port if self._server is not None else None
        self.m["fmrl_build_info"].info(_versions())

    def wait_for_scrape(self, timeout_s: float) -> bool:
        """If anything has scraped this run, wait (at most ``timeout_s``) for one more scrape, so
        it has the final values; True if one came. Runs nobody scrapes end at once."""
        if self._server is None or timeout_s <= 0:
            return False
        with self._scrapes.changed:
            seen = self._scrapes.count
            if seen == 0:
                return False
            print(f"waiting up to {timeout_s:g} s for the metrics' last scrape (metrics.final_scrape_timeout_s)")
            return self._scrapes.changed.wait_for(lambda: self._scrapes.count > seen, timeout_s)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- recording ----------------------------------------------------------------------
    def iteration(self, it: int, stats: dict[str, Any], batch_images: int, prompts: int, steps: int, lag: int,
                  dropped_stale: int, redone_lost: int, lost_reward: int, times: dict[str, float], wall_s: float,
                  reward_names: list[str]) -> None:
        """One driver iteration: what the learner reported and how long each phase took."""
        m = self.m
        m["fmrl_iteration"].set(it)
        m["fmrl_iterations_total"].inc()
        m["fmrl_rollout_images_total"].labels(purpose="train").inc(batch_images)
        rollout_s = times["rollout_duration"]
        m["fmrl_rollout_duration_seconds"].observe(rollout_s)
        if rollout_s > 0:
            m["fmrl_rollout_images_per_second"].set(batch_images / rollout_s)
        m["fmrl_policy_lag_versions"].observe(lag)
        m["fmrl_trajectories_dropped_total"].labels(reason="stale").inc(dropped_stale)
        m["fmrl_trajectories_dropped_total"].labels(reason="sampler_lost").inc(redone_lost)
        m["fmrl_reward_calls_lost_total"].inc(lost_reward)
        if "diversity" in stats and stats["diversity"] == stats["diversity"]:  # NaN: no prompt had two samples
            m["fmrl_batch_diversity"].set(stats["diversity"])
            if self._diversity0 is None:
                self._diversity0 = stats["diversity"]
                m["fmrl_batch_diversity_reference"].set(self._diversity0)
        m["fmrl_reward_mean"].labels(reward="total").set(stats["reward_mean"])
        m["fmrl_reward_std"].labels(reward="total").set(stats["reward_std"])
        for name in reward_names:
            if f"reward/{name}" in stats:
                m["fmrl_reward_mean"].labels(reward=name).set(stats[f"reward/{name}"])
        if "zero_spread_groups" in stats and prompts:
            m["fmrl_zero_spread_group_ratio"].set(stats["zero_spread_groups"] / prompts)
        for key, name in (("adv_clip_fraction", "fmrl_advantage_clip_ratio"), ("critic_loss", "fmrl_critic_loss"),
                          ("explained_variance", "fmrl_critic_explained_variance_ratio"), ("w2", "fmrl_w2_bound"),
                          ("loss", "fmrl_learner_loss")):
            if key in stats:
                m[name].set(stats[key])
        m["fmrl_learner_steps_total"].inc(steps)
        m["fmrl_policy_version"].labels(role="learner").set(stats["version"])
        for phase in ("rollout", "update", "sync", "checkpoint"):
            if phase in times:
                m["fmrl_learner_phase_seconds"].labels(phase=phase).observe(times[phase])
        if wall_s > 0:
            m["fmrl_idle_ratio"].labels(role="learner").set(max(0.0, 1.0 - times["update"] / wall_s))
            m["fmrl_idle_ratio"].labels(role="samplers").set(max(0.0, 1.0 - min(rollout_s, wall_s) / wall_s))

    def pipeline(self, sampler_versions: list[int], pending_batches: int, pending_applies: int,
                 resyncs: int) -> None:
        m = self.m
        m["fmrl_policy_version"].labels(role="sampler").set(min(sampler_versions))
        m["fmrl_pending_rollout_batches"].set(pending_batches)
        m["fmrl_pending_weight_applies"].set(pending_applies)
        if resyncs > self._resyncs:  # the pipeline keeps a running total
            m["fmrl_actor_resyncs_total"].inc(resyncs - self._resyncs)
            self._resyncs = resyncs

    def reward_clients(self, families: list) -> None:
        """The reward clients' latest cumulative metrics (fmrl_reward_client_*)."""
        if families:
            self._clients.families = list(families)

    def baseline(self, resyncs: int) -> None:
        """A resumed run's running totals so far (counters count from this process's start)."""
        self._resyncs = resyncs

    def sync(self, backend: str, seconds: float | None, nbytes: int, samplers: int) -> None:
        if seconds is not None:
            self.m["fmrl_weight_sync_seconds"].labels(backend=backend).observe(seconds)
        self.m["fmrl_weight_sync_bytes_total"].labels(backend=backend).inc(nbytes * samplers)

    def evaluation(self, when: str, ev: Evaluation) -> None:
        self.m["fmrl_eval_reward"].labels(when=when).set(ev.reward)
        self.m["fmrl_eval_diversity"].labels(when=when).set(ev.diversity)
        self.m["fmrl_eval_iteration"].set(ev.iteration)
        for name, value in ev.scores.items():
            self.m["fmrl_eval_score"].labels(reward=name, when=when).set(value)
        for name, value in ev.stats.items():
            self.m["fmrl_eval_image_stat"].labels(stat=name, when=when).set(value)
        for name, value in ev.drift.items():
            self.m["fmrl_eval_drift_ratio"].labels(stat=name).set(value)
        if ev.seconds:
            self.m["fmrl_learner_phase_seconds"].labels(phase="eval").observe(ev.seconds)
        self.m["fmrl_rollout_images_total"].labels(purpose="eval").inc(ev.images.shape[0] * ev.images.shape[1])


def _ray_discovery_file() -> Path | None:
    """The Prometheus discovery file a Ray head with its dashboard writes, if this cluster has one."""
    from ray._private import ray_constants, worker

    try:  # Ray's private layout: where this driver's node keeps its session files
        node = worker._global_node  # noqa: SLF001
        dirs = [Path(node.get_session_dir_path()), Path(node.get_temp_dir_path())]
        name = ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
    except AttributeError:  # not connected, or another Ray: assume none (the run lists the agents)
        return None
    return next((d / name for d in dirs if (d / name).is_file()), None)


def prometheus_targets(run: str, metrics_host: str, metrics_port: int | None) -> list[dict[str, Any]]:
    """The file_sd target groups of a run: its driver's /metrics (job fmrl-training) and, where
    Ray publishes no discovery file of its own, each alive node's Ray metrics agent (job ray)."""
    import ray

    groups = []
    if metrics_port is not None:
        host = "127.0.0.1" if metrics_host in ("0.0.0.0", "::", "") else metrics_host
        groups.append({"targets": [f"{host}:{metrics_port}"], "labels": {"job": "fmrl-training", "run": run}})
    if ray.is_initialized() and _ray_discovery_file() is None:
        here = ray.util.get_node_ip_address()
        agents = sorted(f"{'127.0.0.1' if n['NodeManagerAddress'] == here else n['NodeManagerAddress']}:"
                        f"{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort"))
        if agents:
            groups.append({"targets": agents, "labels": {"job": "ray", "run": run}})
    return groups


def write_prometheus_targets(out_dir: Path, run: str, metrics_host: str, metrics_port: int | None) -> Path:
    """Write ``<out_dir>/prometheus/<run>.json`` atomically (Prometheus may read it any time)."""
    path = Path(out_dir) / "prometheus" / f"{run}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(prometheus_targets(run, metrics_host, metrics_port), indent=1) + "\n")
    tmp.replace(path)
    return path


def _versions() -> dict[str, str]:
    import ray
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}
    try:
        from importlib.metadata import version

        out["fmrl"] = version("fmrl")
        out["diffusers"] = version("diffusers")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out

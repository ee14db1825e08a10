"""Every metric fmrl exposes, declared once: name, type, unit, labels, buckets, help.

Prometheus naming: an ``fmrl_`` prefix, base units in the name (``_seconds``, ``_bytes``,
``_images``, ``_ratio``), counters end in ``_total`` on the wire (prometheus-client adds
it), and labels take only small fixed sets of values (a reward's configured name, a role,
a reason) — never ids, prompts or versions. Dashboards (deploy/grafana/), alerts and
docs/metrics.md use only the names below; a test checks that.

The training job's metrics live in a registry of their own (:func:`training_registry`),
served by the driver; the reward service and the reward client use the default registry
(their process serves it). The ``ray_actor`` ones are recorded inside the Ray actors through
Ray's metrics API (:func:`ray_metric`) and served by every node's Ray metrics agent, which
prefixes them ``ray_`` (:attr:`Metric.series`); Ray (2.60, OpenTelemetry) also reports a
histogram's ``_sum`` from its buckets' midpoints, so exact totals are counters of their own
(``fmrl_actor_busy_seconds_total``) and histograms are read by their buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

Kind = Literal["counter", "gauge", "histogram", "info"]

# seconds to minutes: a digits rollout takes tenths of a second, an SD3 batch on a GPU
# seconds, a queue behind a restarting service minutes
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)
LAG_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    scope: Literal["training", "reward_service", "reward_client", "ray_actor"] = "training"

    @property
    def series(self) -> str:
        """The name a scrape shows (Ray's agent prefixes what actors record with ``ray_``)."""
        return "ray_" + self.name if self.scope == "ray_actor" else self.name


METRICS: tuple[Metric, ...] = (
    # ---- the run ------------------------------------------------------------------------
    Metric("fmrl_build_info", "info", "", "fmrl, Python, torch, Ray and diffusers versions of the training job."),
    Metric("fmrl_iteration", "gauge", "", "The driver iteration last completed (0-based); resumes continue it."),
    Metric("fmrl_iterations_total", "counter", "", "Driver iterations completed by this process."),
    # ---- rollouts ---------------------------------------------------------------------------
    Metric("fmrl_rollout_images_total", "counter", "images", "Images rolled out and kept, by purpose.",
           ("purpose",)),
    Metric("fmrl_rollout_images_per_second", "gauge", "images/s",
           "Rollout throughput of the last iteration: its images ÷ the time from launching its rollouts to having them all."),
    Metric("fmrl_rollout_duration_seconds", "histogram", "seconds",
           "Time from launching a batch's rollouts to having every part of it (including redone parts).",
           buckets=SECONDS_BUCKETS),
    Metric("fmrl_trajectories_dropped_total", "counter", "trajectories",
           "Rollouts not trained on and redone, by reason: stale (beyond max_policy_lag), "
           "sampler_lost (lost with a sampler that died).", ("reason",)),
    Metric("fmrl_reward_calls_lost_total", "counter", "calls", "Scoring calls lost with a reward actor that died, resubmitted."),
    Metric("fmrl_actor_resyncs_total", "counter", "", "Weight resyncs of samplers after a restart or a failed broadcast."),
    # ---- rewards and the learner's statistics ------------------------------------------------
    Metric("fmrl_reward_mean", "gauge", "", "Mean of a reward component over the last training batch "
           "(reward=\"total\": the weighted sum trained on).", ("reward",)),
    Metric("fmrl_reward_std", "gauge", "", "Standard deviation of the training reward over the last batch.", ("reward",)),
    Metric("fmrl_zero_spread_group_ratio", "gauge", "ratio",
           "Share of the last batch's prompts whose rewards were all equal (no learning signal from them)."),
    Metric("fmrl_advantage_clip_ratio", "gauge", "ratio", "Share of the last batch's advantages clipped at ±A_max."),
    Metric("fmrl_critic_loss", "gauge", "", "AC-Flow's critic regression loss on the last batch."),
    Metric("fmrl_critic_explained_variance_ratio", "gauge", "ratio",
           "Share of the shaped-reward variance AC-Flow's critic explains on the last batch."),
    Metric("fmrl_w2_bound", "gauge", "", "Mean ‖v_θ − v_anchor‖² per element on the last batch, the objective's "
           "W2 term: to π_ref, the integrand of ORW-CFM-W2's bound on W2²(π_θ, π_ref), or to π_old where AC-Flow "
           "anchors it there (its default)."),
    Metric("fmrl_learner_loss", "gauge", "", "The objective's mean per-sample loss on the last batch."),
    Metric("fmrl_learner_steps_total", "counter", "", "Optimiser steps of the learner."),
    Metric("fmrl_batch_diversity", "gauge", "", "Mean pairwise distance between a prompt's samples in the last "
           "training batch (pixels in [0, 1]), averaged over prompts: falls as the policy collapses."),
    Metric("fmrl_batch_diversity_reference", "gauge", "", "fmrl_batch_diversity of this process's first "
           "training batch: the yardstick of the collapse alert."),
    Metric("fmrl_eval_reward", "gauge", "", "Mean reward of the CFG-free evaluation samples, by evaluation "
           "(before, iteration: the last one between batches, after).", ("when",)),
    Metric("fmrl_eval_diversity", "gauge", "", "Mean pairwise distance between evaluation samples of a prompt "
           "(pixels in [0, 1]), averaged over prompts, by evaluation.", ("when",)),
    Metric("fmrl_eval_iteration", "gauge", "", "Iterations trained before the last evaluation (0 before "
           "training; every eval.every iterations; run.iterations after)."),
    Metric("fmrl_eval_score", "gauge", "", "Mean of each eval.rewards component over the evaluation samples "
           "(rewards the run may not train on), and reward=\"heldout_svm\": the held-out classifier's "
           "accuracy (digits world), by evaluation.", ("reward", "when")),
    Metric("fmrl_eval_image_stat", "gauge", "", "Reward-hacking watch: a statistic of the evaluation samples, "
           "by evaluation (when=\"before\" is the base policy's): brightness (mean luma, [0, 1]), saturation "
           "(mean HSV saturation; 0 greyscale), edge_density (share of pixels with luma gradient > 0.25), "
           "colour_entropy (bits of the image's 8-level-per-channel colour histogram), jpeg_bytes (mean "
           "size at quality 75).", ("stat", "when")),
    Metric("fmrl_eval_drift_ratio", "gauge", "ratio", "Reward-hacking watch: the last evaluation's statistic "
           "(fmrl_eval_image_stat's, and diversity) against the base policy's, max/min of the two: 1 is no "
           "drift, f a factor f up or down.", ("stat",)),
    Metric("fmrl_eval_watch_factor", "gauge", "ratio", "eval.watch_factor: the drift the FmrlRewardHacking "
           "alert tolerates."),
    # ---- versions, lag, weight sync -----------------------------------------------------------
    Metric("fmrl_policy_version", "gauge", "", "Policy version: the learner's published one, and the oldest "
           "a sampler has verifiably applied.", ("role",)),
    Metric("fmrl_policy_lag_versions", "histogram", "versions",
           "Published versions between the weights that rolled out a batch and the learner's when it trained on it.",
           buckets=LAG_BUCKETS),
    Metric("fmrl_weight_sync_seconds", "histogram", "seconds",
           "Time to publish a version and have every sampler apply it (when the driver waits for it).",
           ("backend",), SECONDS_BUCKETS),
    Metric("fmrl_weight_sync_bytes_total", "counter", "bytes", "Bytes of weights published, times the samplers "
           "they went to.", ("backend",)),
    Metric("fmrl_pending_rollout_batches", "gauge", "batches", "Batches rolling out ahead of the learner "
           "(at most max_policy_lag)."),
    Metric("fmrl_pending_weight_applies", "gauge", "applies", "Weight applies sent to samplers and not yet verified."),
    # ---- time ---------------------------------------------------------------------------------
    Metric("fmrl_learner_phase_seconds", "histogram", "seconds",
           "Driver-side time of each phase of an iteration: rollout (waiting for the batch), update "
           "(the learner's step), sync (publishing), checkpoint, eval (an evaluation: sampling and "
           "scoring).", ("phase",), SECONDS_BUCKETS),
    Metric("fmrl_idle_ratio", "gauge", "ratio", "Share of the last iteration a role spent not working: the "
           "learner outside its update, the samplers outside their rollouts.", ("role",)),
    # ---- the reward service (its own process serves these) -----------------------------------
    Metric("fmrl_reward_service_requests_total", "counter", "requests", "Requests handled by a reward service, by "
           "outcome (ok, duplicate, rejected, failed, dead).", ("reward", "outcome"), scope="reward_service"),
    Metric("fmrl_reward_service_images_total", "counter", "images", "Images scored by a reward service.", ("reward",),
           scope="reward_service"),
    Metric("fmrl_reward_service_request_seconds", "histogram", "seconds",
           "Time from reading a request to writing its result (decode, score, write).", ("reward",),
           LATENCY_BUCKETS, scope="reward_service"),
    Metric("fmrl_reward_service_dead_letters_total", "counter", "requests",
           "Requests moved to the dead-letter stream, by reason.", ("reward", "reason"), scope="reward_service"),
    Metric("fmrl_reward_service_reclaimed_total", "counter", "entries",
           "Stream entries reclaimed (XAUTOCLAIM) from a consumer idle past the claim timeout.", ("reward",),
           scope="reward_service"),
    Metric("fmrl_reward_service_queue_depth", "gauge", "entries", "Requests in the reward's stream not yet "
           "delivered to any service of its group (Redis's consumer-group lag), sampled at most once a second.",
           ("reward",), scope="reward_service"),
    Metric("fmrl_reward_service_pending_entries", "gauge", "entries", "Requests delivered to a service and not "
           "yet acknowledged (the group's pending entries list: in hand, or held by a dead service until "
           "reclaimed).", ("reward",), scope="reward_service"),
    # ---- the reward client (in the training job's reward actor) ------------------------------
    Metric("fmrl_reward_client_request_seconds", "histogram", "seconds",
           "Time from first submitting a request to consuming its result.", ("reward",), LATENCY_BUCKETS,
           scope="reward_client"),
    Metric("fmrl_reward_client_errors_total", "counter", "errors", "Reward client errors, by kind (timeout, "
           "unavailable, worker_error, redis).", ("reward", "kind"), scope="reward_client"),
    Metric("fmrl_reward_client_in_flight", "gauge", "requests", "Requests submitted and not yet answered.",
           ("reward",), scope="reward_client"),
    # ---- inside the Ray actors (Ray's metrics agent serves them, prefixed ray_) ---------------
    Metric("fmrl_actor_busy_seconds_total", "counter", "seconds", "Seconds an actor spent in its work calls "
           "(rollouts and weight applies; updates and publishing; scoring), by role: 1 - rate() is its idle "
           "share, per actor (Ray's WorkerId label).", ("role",), scope="ray_actor"),
    Metric("fmrl_sampler_rollout_seconds", "histogram", "seconds", "A sampler's compute time for one rollout "
           "call, inside the actor (no queueing, no transfer).", buckets=SECONDS_BUCKETS, scope="ray_actor"),
    Metric("fmrl_sampler_rollout_images_total", "counter", "images", "Images a sampler rolled out (training "
           "and evaluation, dropped ones included).", scope="ray_actor"),
    Metric("fmrl_sampler_weight_apply_seconds", "histogram", "seconds", "A sampler's time to receive, verify "
           "and load a version, by backend (a broadcast's includes waiting for it).", ("backend",),
           SECONDS_BUCKETS, scope="ray_actor"),
    Metric("fmrl_sampler_policy_version", "gauge", "", "The policy version a sampler holds (one series per "
           "sampler).", scope="ray_actor"),
    Metric("fmrl_learner_step_phase_seconds", "histogram", "seconds", "The learner's time per optimiser "
           "step inside its actor, by phase: prepare (the objective's whole-batch inputs: critic fit, "
           "advantages), forward_backward (with a learner group's gradient all-reduce), optimizer (clip, "
           "step, the rollout policy's update); by learner rank.", ("phase", "rank"),
           SECONDS_BUCKETS, scope="ray_actor"),
    Metric("fmrl_learner_publish_seconds", "histogram", "seconds", "The learner's time to publish a version "
           "(copy and checksum; a broadcast's send), by backend.", ("backend",), SECONDS_BUCKETS,
           scope="ray_actor"),
    Metric("fmrl_reward_score_seconds", "histogram", "seconds", "The reward actor's time to score one "
           "batch, by reward component (a Redis component's includes the service's round trip).",
           ("reward",), LATENCY_BUCKETS, scope="ray_actor"),
)

BY_NAME = {m.name: m for m in METRICS}
_CLASSES = {"counter": Counter, "gauge": Gauge, "histogram": Histogram, "info": Info}


def spec(name: str) -> Metric:
    if name not in BY_NAME:
        raise KeyError(f"metric {name!r} is not declared in telemetry/metrics.py")
    return BY_NAME[name]


def create(name: str, registry: CollectorRegistry | None = None):  # noqa: ANN201 - a prometheus metric
    """The prometheus-client object of a declared metric, in ``registry`` (default: the global one)."""
    m = spec(name)
    kw = {"registry": registry} if registry is not None else {}
    if m.kind == "histogram":
        kw["buckets"] = m.buckets or SECONDS_BUCKETS
    # prometheus-client appends _total to counters and _info to info metrics itself
    name = m.name.removesuffix({"counter": "_total", "info": "_info"}.get(m.kind, "")) if m.kind in ("counter", "info") else m.name
    return _CLASSES[m.kind](name, m.help, list(m.labels), **kw)


def exposed(m: Metric) -> tuple[str, str]:
    """The family name and type a scrape shows for ``m`` (text format 0.0.4: info is a gauge)."""
    if m.kind == "counter":
        return m.series.removesuffix("_total"), "counter"
    if m.kind == "info":
        return m.series, "gauge"
    return m.series, m.kind


def ray_metric(name: str):  # noqa: ANN201 - a ray.util.metrics object
    """The Ray metric of a declared ``ray_actor`` metric, for use inside an actor."""
    from ray.util import metrics as rm

    m = spec(name)
    if m.scope != "ray_actor":
        raise ValueError(f"{name} is not recorded through Ray's metrics (scope {m.scope})")
    if m.kind == "counter":
        return rm.Counter(m.name, m.help, m.labels)
    if m.kind == "gauge":
        return rm.Gauge(m.name, m.help, m.labels)
    return rm.Histogram(m.name, m.help, list(m.buckets or SECONDS_BUCKETS), m.labels)


def training_registry() -> tuple[CollectorRegistry, dict[str, object]]:
    """A fresh registry holding every training metric, and the metric objects by name."""
    registry = CollectorRegistry()
    return registry, {m.name: create(m.name, registry) for m in METRICS if m.scope == "training"}


def markdown_table() -> str:
    """The table docs/metrics.md carries (a test keeps the two equal)."""
    rows = ["| name | type | unit | labels | help |", "|---|---|---|---|---|"]
    for m in METRICS:
        labels = ", ".join(f"`{x}`" for x in m.labels) or "—"
        rows.append(f"| `{m.series}` | {m.kind} | {m.unit or '—'} | {labels} | {m.help} |")
    return "\n".join(rows)

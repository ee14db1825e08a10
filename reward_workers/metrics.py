"""Every metric of the reward service and its client, declared once (Prometheus naming).

Base units (seconds, images), counters end in ``_total`` on the wire, labels are only
``reward``, ``outcome``, ``reason`` and the client's error ``kind``; all values below are
small fixed sets, never ids.

Service ``outcome``: ``ok`` (scored, result written), ``duplicate`` (a result already
existed: not rescored, the client re-notified), ``rejected`` (broke the contract: dead
letter and error result), ``failed`` (the reward raised: left pending for a retry),
``dead`` (failed its last allowed delivery: dead letter and error result).
Dead-letter ``reason``: a :data:`reward_workers.contract.ContractReason` or ``max_deliveries``.
Client ``kind``: ``timeout`` (an attempt expired; the request is resubmitted),
``unavailable`` (attempts exhausted), ``worker_error`` (the service returned an error
result), ``redis`` (Redis itself failed).
"""

from __future__ import annotations

from telemetry.metrics import create

# declared (name, help, labels, buckets) in telemetry/metrics.py; created here, in the
# default registry that the reward service's own /metrics serves
SERVICE_REQUESTS = create("fmrl_reward_service_requests_total")
SERVICE_IMAGES = create("fmrl_reward_service_images_total")
SERVICE_REQUEST_SECONDS = create("fmrl_reward_service_request_seconds")
SERVICE_DEAD_LETTERS = create("fmrl_reward_service_dead_letters_total")
SERVICE_RECLAIMED = create("fmrl_reward_service_reclaimed_total")
SERVICE_QUEUE_DEPTH = create("fmrl_reward_service_queue_depth")
SERVICE_PENDING = create("fmrl_reward_service_pending_entries")
CLIENT_REQUEST_SECONDS = create("fmrl_reward_client_request_seconds")
CLIENT_ERRORS = create("fmrl_reward_client_errors_total")
CLIENT_IN_FLIGHT = create("fmrl_reward_client_in_flight")


def client_metric_families() -> list:
    """The reward client's metric families as this process holds them (cumulative), for a
    training job to serve from its driver (the client runs inside a Ray actor)."""
    from prometheus_client import REGISTRY

    return [m for m in REGISTRY.collect() if m.name.startswith("fmrl_reward_client_")]

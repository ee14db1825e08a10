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

from prometheus_client import Counter, Gauge, Histogram

# milliseconds to minutes: a digits CNN answers in ms, a large preference model in seconds,
# a queue behind a restarting service in minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)

SERVICE_REQUESTS = Counter(
    "fmrl_reward_service_requests", "Requests handled by a reward service, by outcome.",
    ["reward", "outcome"])
SERVICE_IMAGES = Counter(
    "fmrl_reward_service_images", "Images scored by a reward service.", ["reward"])
SERVICE_REQUEST_SECONDS = Histogram(
    "fmrl_reward_service_request_seconds",
    "Time from reading a request to writing its result (decode, score, write), in seconds.",
    ["reward"], buckets=LATENCY_BUCKETS)
SERVICE_DEAD_LETTERS = Counter(
    "fmrl_reward_service_dead_letters", "Requests moved to the dead-letter stream, by reason.",
    ["reward", "reason"])
SERVICE_RECLAIMED = Counter(
    "fmrl_reward_service_reclaimed",
    "Stream entries reclaimed (XAUTOCLAIM) from a consumer idle past the claim timeout.", ["reward"])

CLIENT_REQUEST_SECONDS = Histogram(
    "fmrl_reward_client_request_seconds",
    "Time from first submitting a request to consuming its result, in seconds.",
    ["reward"], buckets=LATENCY_BUCKETS)
CLIENT_ERRORS = Counter(
    "fmrl_reward_client_errors", "Reward client errors, by kind.", ["reward", "kind"])
CLIENT_IN_FLIGHT = Gauge(
    "fmrl_reward_client_in_flight", "Requests submitted and not yet answered.", ["reward"])

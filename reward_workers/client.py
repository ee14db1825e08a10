"""The training side of a reward service: submit images and prompts, get scores back in order.

``RewardClient.score`` splits a batch into requests, keeps a bounded number in flight on the
reward's request stream, and blocks (BLPOP on its own reply list, no polling) until results
arrive. A request whose attempt times out is resubmitted under the same id, so a late
original and its resubmission collapse into the single result the service writes with SET NX.
Each result is taken exactly once by swapping in its consumed marker (SET XX GET), and only
when it carries this request's digest: a result for other content under the same id (a reused
id) is left to its owner and this request fails with a RewardError naming the id.

One client per thread: it is not thread-safe.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis

from reward_workers import metrics
from reward_workers.base import RewardOutput, check_batch
from reward_workers.contract import (
    RESULT_CONSUMED,
    ImageEncoding,
    RequestLimits,
    RewardRequest,
    RewardResult,
    StreamLayout,
    consumed_marker,
    decode_result,
    encode_request,
    request_digest,
    request_fields,
    stored_digest,
)

log = logging.getLogger(__name__)

# a blocking wait never outlasts redis-py's default 5 s socket timeout
_MAX_BLOCK_S = 2.0


class RewardUnavailable(RuntimeError):
    """No result came back in time for a required reward."""

    def __init__(self, reward: str, stream: str, waited_s: float, message: str) -> None:
        super().__init__(message)
        self.reward, self.stream, self.waited_s = reward, stream, waited_s

    def __reduce__(self) -> tuple:  # survives pickling across Ray's actor boundary
        return type(self), (self.reward, self.stream, self.waited_s, str(self))


class RewardError(RuntimeError):
    """The reward service answered with an error result (its reason is the message)."""

    def __init__(self, reward: str, request_id: str, reason: str) -> None:
        super().__init__(f"reward {reward!r} failed request {request_id}: {reason}")
        self.reward, self.request_id, self.reason = reward, request_id, reason

    def __reduce__(self) -> tuple:
        return type(self), (self.reward, self.request_id, self.reason)


class RedisUnreachable(ConnectionError):
    """Redis cannot be reached or refused the credentials; the message names the (redacted) URL."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable URL>"


def connect(url: str, *, client_name: str | None = None, check: bool = True) -> redis.Redis:
    """A Redis client for ``url`` (redis://, rediss:// with TLS options as query arguments,
    user:password@ for ACL users); with ``check``, a PING proves it is reachable and the
    credentials work, or a ValueError / RedisUnreachable says which and where."""
    try:
        client = redis.Redis.from_url(url, client_name=client_name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad Redis URL {redact_url(url)!r}: {e}") from None
    if check:
        try:
            client.ping()
        except (redis.AuthenticationError, redis.ResponseError) as e:
            # ResponseError: e.g. NOAUTH from servers that answer HELLO / PING that way
            if urlsplit(url).password is None:
                raise RedisUnreachable(f"Redis at {redact_url(url)} requires authentication; put "
                                       f"user:password@ in the URL ({e})") from None
            raise RedisUnreachable(f"Redis at {redact_url(url)} rejected the credentials: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise RedisUnreachable(f"cannot reach Redis at {redact_url(url)}: {e}") from None
    return client


def check_binary(client: redis.Redis) -> None:
    """Payloads and results are bytes: a client that decodes responses to str cannot carry them."""
    if client.get_connection_kwargs().get("decode_responses"):
        raise ValueError("the reward transport needs a Redis client with decode_responses=False")


@dataclass
class _InFlight:
    index: int
    request: RewardRequest
    payload: bytes
    digest: str
    first_sent: float
    deadline: float
    entry_ids: list[bytes] = field(default_factory=list)


class RewardClient:
    """Scores batches through the reward service of ``reward`` reached via Redis.

    redis: a URL (see :func:`connect`) or a ready client.
    required: when attempts run out, raise RewardUnavailable (True) or return None (False,
        the caller drops this reward component; counted as an ``unavailable`` error).
    max_images_per_request: a batch is split into requests of at most this many images (fewer
        where ``limits.max_pixels_per_request`` asks for it).
    max_in_flight: most requests of this client waiting for results at once.
    timeout_s: how long one attempt of a request waits before it is resubmitted.
    attempts: submissions per request (the first included) before giving up.
    encoding: ``png`` (compact for real images) or ``raw`` (no encode/decode cost).
    result_ttl_s: how long results, consumed markers and reply lists live in Redis.
    """

    def __init__(self, redis_or_url: redis.Redis | str, reward: str, *, stream: str | None = None,
                 required: bool = True, max_images_per_request: int = 64, max_in_flight: int = 4,
                 timeout_s: float = 60.0, attempts: int = 3, encoding: ImageEncoding = "raw",
                 limits: RequestLimits | None = None, result_ttl_s: int = 3600,
                 client_id: str | None = None) -> None:
        if max_images_per_request < 1 or max_in_flight < 1 or attempts < 1 or timeout_s <= 0:
            raise ValueError("max_images_per_request, max_in_flight and attempts must be ≥ 1 "
                             "and timeout_s > 0")
        self.redis = connect(redis_or_url) if isinstance(redis_or_url, str) else redis_or_url
        check_binary(self.redis)
        self.layout = StreamLayout.for_reward(reward, stream)
        self.reward, self.required = reward, required
        self.limits = limits or RequestLimits()
        self.max_images_per_request = min(max_images_per_request, self.limits.max_images)
        self.max_in_flight, self.timeout_s, self.attempts = max_in_flight, timeout_s, attempts
        self.encoding, self.result_ttl_s = encoding, result_ttl_s
        self.client_id = client_id or uuid.uuid4().hex
        self.reply_key = self.layout.reply_key(self.client_id)
        self._errors = {k: metrics.CLIENT_ERRORS.labels(reward, k)
                        for k in ("timeout", "unavailable", "worker_error", "redis")}
        self._in_flight_gauge = metrics.CLIENT_IN_FLIGHT.labels(reward)
        self._latency = metrics.CLIENT_REQUEST_SECONDS.labels(reward)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop this client's reply list (results of abandoned requests expire on their own)."""
        try:
            self.redis.delete(self.reply_key)
        except redis.RedisError:
            pass

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput | None:
        """A remote reward is called like a local one (see :meth:`score`)."""
        return self.score(images, prompts, metadata)

    def score(self, images: np.ndarray, prompts: list[str],
              metadata: list[dict] | None = None) -> RewardOutput | None:
        """Scores for uint8 ``images`` (N, H, W, C) and N ``prompts``, in order; ``metadata``
        (one JSON object per prompt, or None) travels in the requests to the reward.

        Raises RewardError when the service reports a failure, RewardUnavailable when a
        required reward does not answer within ``attempts × timeout_s`` per request; returns
        None instead for an optional one.
        """
        check_batch(images, prompts)
        n = len(images)
        if n == 0:
            return RewardOutput(scores=np.zeros(0))
        per_request = min(self.max_images_per_request,
                          self.limits.images_per_request(images.shape[1], images.shape[2]))
        bounds = [(s, min(s + per_request, n)) for s in range(0, n, per_request)]
        started = time.monotonic()
        try:
            results = self._run(images, prompts, bounds, metadata)
        except RewardUnavailable as e:
            self._errors["unavailable"].inc()
            if self.required:
                raise
            log.warning("%s; continuing without this reward", e)
            return None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._errors["redis"].inc()
            waited = time.monotonic() - started
            message = (f"reward {self.reward!r} unavailable: Redis failed while waiting on stream "
                       f"{self.layout.requests!r} after {waited:.1f} s: {e}")
            if self.required:
                raise RewardUnavailable(self.reward, self.layout.requests, waited, message) from e
            log.warning("%s; continuing without this reward", message)
            return None
        outputs = [r.to_output() for r in results]
        keys = set(outputs[0].details)
        if any(set(o.details) != keys for o in outputs):
            raise RewardError(self.reward, results[0].request_id,
                              "results of one batch carry different detail names")
        return RewardOutput(scores=np.concatenate([o.scores for o in outputs]),
                            details={k: np.concatenate([o.details[k] for o in outputs]) for k in keys})

    # ------------------------------------------------------------------ internals

    def _run(self, images: np.ndarray, prompts: list[str], bounds: list[tuple[int, int]],
             metadata: list[dict] | None = None) -> list[RewardResult]:
        todo = deque(range(len(bounds)))
        flying: dict[str, _InFlight] = {}
        done: dict[int, RewardResult] = {}
        started = time.monotonic()
        try:
            while todo or flying:
                while todo and len(flying) < self.max_in_flight:
                    i = todo.popleft()
                    lo, hi = bounds[i]
                    p = self._submit(i, images[lo:hi], prompts[lo:hi],
                                     None if metadata is None else metadata[lo:hi])
                    flying[p.request.request_id] = p
                now = time.monotonic()
                for p in [p for p in flying.values() if p.deadline <= now]:
                    if self._take(p, flying, done):
                        continue  # answered, only the notification was missed
                    self._errors["timeout"].inc()
                    if p.request.attempt >= self.attempts:
                        waited = now - started
                        raise RewardUnavailable(
                            self.reward, self.layout.requests, waited,
                            f"reward {self.reward!r} unavailable: no result for request "
                            f"{p.request.request_id} on stream {self.layout.requests!r} after "
                            f"{self.attempts} attempt(s) of {self.timeout_s:g} s ({waited:.1f} s "
                            f"waited); is a reward service (`fmrl reward-worker --reward "
                            f"{self.reward}`) running against this Redis?")
                    self._resubmit(p)
                if not flying:
                    continue
                wait = min(p.deadline for p in flying.values()) - time.monotonic()
                popped = self.redis.blpop([self.reply_key], timeout=min(max(wait, 0.01), _MAX_BLOCK_S))
                if popped is not None:
                    rid = popped[1].decode()
                    if rid in flying:
                        self._take(flying[rid], flying, done)
        finally:
            if flying:
                self._abandon(list(flying.values()))
        return [done[i] for i in range(len(bounds))]

    def _submit(self, index: int, images: np.ndarray, prompts: list[str],
                metadata: list[dict] | None = None) -> _InFlight:
        request, fields = encode_request(
            images, prompts, reward=self.reward, request_id=uuid.uuid4().hex, reply_to=self.reply_key,
            encoding=self.encoding, limits=self.limits, metadata=metadata)
        now = time.monotonic()
        p = _InFlight(index, request, fields["images"], request_digest(request, fields["images"]),
                      now, now + self.timeout_s)
        p.entry_ids.append(self.redis.xadd(self.layout.requests, fields))
        self._in_flight_gauge.inc()
        return p

    def _resubmit(self, p: _InFlight) -> None:
        """The same request id again (attempt + 1); the superseded entry is deleted only
        after the new one is in the stream, so the request is never absent from it."""
        p.request = p.request.model_copy(update={"attempt": p.request.attempt + 1})
        p.entry_ids.append(self.redis.xadd(self.layout.requests, request_fields(p.request, p.payload)))
        self.redis.xdel(self.layout.requests, *p.entry_ids[:-1])
        p.deadline = time.monotonic() + self.timeout_s
        log.info("reward %s: request %s timed out, resubmitted (attempt %d of %d)", self.reward,
                 p.request.request_id, p.request.attempt, self.attempts)

    def _take(self, p: _InFlight, flying: dict[str, _InFlight], done: dict[int, RewardResult]) -> bool:
        """Take p's result if it is there (atomically marking it consumed); False if not yet.
        A value bound to another request's digest (a reused id) is left alone: RewardError."""
        key = self.layout.result_key(p.request.request_id)
        self._check_digest(p, self.redis.get(key))
        # a result is written once (SET NX), so what the swap returns is what was checked,
        # or a marker when a duplicate of this very request was taken meanwhile
        raw = self.redis.set(key, consumed_marker(p.digest), xx=True, keepttl=True, get=True)
        if raw is None or raw.startswith(RESULT_CONSUMED):
            return False
        del flying[p.request.request_id]
        self._in_flight_gauge.dec()
        self._latency.observe(time.monotonic() - p.first_sent)
        if len(p.entry_ids) > 1:  # a resubmitted copy may still wait in the stream: save its work
            self.redis.xdel(self.layout.requests, *p.entry_ids)
        result = decode_result(raw)
        if not result.ok:  # an error result names the service's reward, maybe not ours
            self._errors["worker_error"].inc()
            raise RewardError(self.reward, p.request.request_id, result.error or "unknown error")
        if result.request_id != p.request.request_id or result.reward != self.reward:
            raise RewardError(self.reward, p.request.request_id,
                              f"result key holds the answer to {result.reward}/{result.request_id}")
        done[p.index] = result
        return True

    def _check_digest(self, p: _InFlight, raw: bytes | None) -> None:
        digest = stored_digest(raw) if raw is not None else ""
        if digest and digest != p.digest:
            self._errors["worker_error"].inc()
            raise RewardError(self.reward, p.request.request_id,
                              f"id_reused: request id {p.request.request_id} was already used for "
                              f"other images or prompts (digest {digest[:16]}…, this request "
                              f"{p.digest[:16]}…); its result is not this request's")

    def _abandon(self, pending: list[_InFlight]) -> None:
        """Withdraw requests nobody waits for any more: delete their entries and pre-mark their
        results consumed, so a service does not score them. SET NX: a result already there
        expires on its own, and one of another request under the same id stays its owner's."""
        self._in_flight_gauge.dec(len(pending))
        try:
            pipe = self.redis.pipeline(transaction=False)
            for p in pending:
                pipe.xdel(self.layout.requests, *p.entry_ids)
                pipe.set(self.layout.result_key(p.request.request_id), consumed_marker(p.digest),
                         ex=self.result_ttl_s, nx=True)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("reward %s: could not withdraw %d abandoned request(s): %s", self.reward,
                        len(pending), e)

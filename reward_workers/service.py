"""A reward model as a separate service: a consumer of the reward's Redis request stream.

Per stream entry, in this order (each step idempotent, so a crash anywhere only repeats work):

1. decode and validate (contract.py); a broken entry goes to the dead-letter stream with its
   reason and, when the request id and reply list are readable, an error result is written
   so the client fails fast;
2. if a result (or the consumed marker) already exists under the request id, do not score
   again: re-notify (the first notification may be what was lost) and ack;
3. score; if the reward raises, leave the entry pending, marked idle enough to be reclaimed
   (by any service) after ``retry_after_s``; dead-letter it once it failed ``max_deliveries``
   deliveries;
4. write the result with SET NX EX (a second processing never overwrites), push the request
   id onto the client's reply list, then XACK and XDEL the entry.

Entries a dead or stuck consumer holds longer than ``claim_idle_s`` are taken over with
XAUTOCLAIM. SIGTERM / SIGINT: finish the batch in hand, ack it, exit 0.

A dead letter (an entry of ``StreamLayout.dead``) has the fields ``reason`` (a
ContractReason or ``max_deliveries``), ``error`` (the message), ``entry_id``, ``stream``,
``consumer``, ``deliveries``, ``time``, and the original entry's fields as ``orig.<name>``.

Run: ``python -m reward_workers.service --reward digits_classifier --redis-url redis://...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reward_workers import metrics
from reward_workers.base import Reward
from reward_workers.client import RedisUnreachable, check_binary, connect, redact_url
from reward_workers.contract import (
    REQUEST_ID_PATTERN,
    RESULT_CONSUMED,
    ContractError,
    RequestLimits,
    RewardResult,
    StreamLayout,
    decode_request,
    encode_result,
    peek_request,
)

log = logging.getLogger(__name__)
_MAX_BACKOFF_S = 10.0


def _valid_id(request_id: object) -> bool:
    return isinstance(request_id, str) and re.fullmatch(REQUEST_ID_PATTERN, request_id) is not None


def default_consumer() -> str:
    """Unique per process, stable for its life: a replacement never inherits a dead PEL by name."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceConfig(BaseModel):
    """One reward service's settings (the command line maps onto these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: str = Field(description="the reward's name (its registry kind), as clients send it")
    stream: str | None = Field(None, description="request stream; default fmrl:reward:{reward}:requests")
    group: str | None = Field(None, description="consumer group; default fmrl-reward-{reward}")
    dead_stream: str | None = Field(None, description="dead-letter stream; default fmrl:reward:{reward}:dead")
    consumer: str = Field(default_factory=default_consumer,
                          description="this process's consumer name; unique per process")
    batch: int = Field(4, ge=1, description="stream entries read per XREADGROUP (COUNT)")
    block_ms: int = Field(1000, ge=1, le=4000,
                          description="longest XREADGROUP wait; bounds how late SIGTERM is noticed")
    claim_idle_s: float = Field(60.0, gt=0, description="entries idle this long in another "
                                "consumer are reclaimed; must exceed the slowest scoring")
    max_deliveries: int = Field(3, ge=1, description="deliveries of one entry before it is dead-lettered")
    retry_after_s: float = Field(1.0, ge=0, description="a request whose scoring raised is retried "
                                 "(redelivered) after this long, not after claim_idle_s")
    result_ttl_s: int = Field(3600, ge=1, description="lifetime of results and reply lists in Redis")
    dead_maxlen: int = Field(10_000, ge=1, description="approximate cap on the dead-letter stream")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="accepted request sizes")

    def layout(self) -> StreamLayout:
        return StreamLayout.for_reward(self.reward, self.stream, self.group, self.dead_stream)


class RewardService:
    """Consumes one reward's request stream in a consumer group and writes its results."""

    def __init__(self, reward: Reward, client: redis.Redis, config: ServiceConfig) -> None:
        check_binary(client)
        self.reward_model, self.redis, self.config = reward, client, config
        self.layout = config.layout()
        self.stop_event = threading.Event()
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        name = config.reward
        self._outcomes = {k: metrics.SERVICE_REQUESTS.labels(name, k)
                          for k in ("ok", "duplicate", "rejected", "failed", "dead")}
        self._images = metrics.SERVICE_IMAGES.labels(name)
        self._seconds = metrics.SERVICE_REQUEST_SECONDS.labels(name)
        self._reclaimed = metrics.SERVICE_RECLAIMED.labels(name)
        self._depth = metrics.SERVICE_QUEUE_DEPTH.labels(name)
        self._pending = metrics.SERVICE_PENDING.labels(name)
        self._next_queue_sample = 0.0

    # ------------------------------------------------------------------ the loop

    def ensure_group(self) -> None:
        """Create the stream and group if missing; from id 0, so requests sent before any
        service existed are served too."""
        try:
            self.redis.xgroup_create(self.layout.requests, self.layout.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run(self) -> None:
        """Serve until ``stop_event`` is set; Redis outages are waited out with backoff."""
        self.ensure_group()
        backoff = 0.1
        while not self.stop_event.is_set():
            try:
                self.step()
                backoff = 0.1
            except redis.ResponseError as e:
                # NOGROUP: the group is gone; UNBLOCKED: the stream was deleted under a blocked read
                if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                    raise
                log.warning("consumer group %s vanished (Redis restarted or lost its data?); recreating it",
                            self.layout.group)
                self._retry_later(self.ensure_group)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis unavailable (%s); retrying in %.1f s", e, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        self._leave_group()

    def _retry_later(self, action: Callable[[], None]) -> None:
        try:
            action()
        except redis.RedisError as e:
            log.warning("%s; retrying", e)
            self.stop_event.wait(0.5)

    def step(self) -> int:
        """One cycle: reclaim idle entries when due, read new ones, handle them all.
        Returns the number of entries handled. The batch in hand is always finished."""
        handled = 0
        now = time.monotonic()
        if now >= self._next_queue_sample:
            self._next_queue_sample = now + 1.0
            self.sample_queue()
        if now >= self._next_claim:
            self._next_claim = now + min(self.config.claim_idle_s / 2, 5.0)
            handled += self._handle_all(self._reclaim())
        if self.stop_event.is_set():
            return handled
        resp = self.redis.xreadgroup(self.layout.group, self.config.consumer,
                                     {self.layout.requests: ">"}, count=self.config.batch,
                                     block=self.config.block_ms)
        entries = [(eid, fields, 1) for _, batch in (resp or []) for eid, fields in batch]
        return handled + self._handle_all(entries)

    def sample_queue(self) -> tuple[int | None, int]:
        """Set the queue gauges from XINFO GROUPS: (entries not yet delivered — None where Redis
        cannot tell, before 7.0 or after deletions —, entries delivered and not acknowledged)."""
        try:
            groups = self.redis.xinfo_groups(self.layout.requests)
        except redis.ResponseError:  # no stream (Redis lost its data): reading recreates it and the group
            return None, 0
        group = next((g for g in groups if g["name"] in (self.layout.group, self.layout.group.encode())), None)
        if group is None:
            return None, 0
        lag, pending = group.get("lag"), int(group["pending"])
        if lag is not None:
            self._depth.set(int(lag))
        self._pending.set(pending)
        return (None if lag is None else int(lag)), pending

    def _handle_all(self, entries: list[tuple[bytes, dict, int]]) -> int:
        for entry_id, fields, deliveries in entries:
            self.handle(entry_id, fields, deliveries)
        return len(entries)

    def _reclaim(self) -> list[tuple[bytes, dict, int]]:
        """XAUTOCLAIM entries idle past claim_idle_s, with their delivery counts (XPENDING)."""
        resp = self.redis.xautoclaim(self.layout.requests, self.layout.group, self.config.consumer,
                                     min_idle_time=int(self.config.claim_idle_s * 1000),
                                     start_id=self._claim_cursor, count=self.config.batch)
        cursor, claimed = resp[0], resp[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor != "0-0":
            self._next_claim = 0.0  # more idle entries behind these: claim again next cycle
        claimed = [(eid, fields) for eid, fields in claimed if fields is not None]
        if not claimed:
            return []
        self._reclaimed.inc(len(claimed))
        pipe = self.redis.pipeline(transaction=False)
        for eid, _ in claimed:
            pipe.xpending_range(self.layout.requests, self.layout.group, eid, eid, 1,
                                consumername=self.config.consumer)
        counts = {p["message_id"]: p["times_delivered"] for rows in pipe.execute() for p in rows}
        log.info("reclaimed %d idle entr%s", len(claimed), "y" if len(claimed) == 1 else "ies")
        # the claim itself counted as a delivery; an entry no longer pending was acked meanwhile
        return [(eid, f, counts[eid]) for eid, f in claimed if eid in counts]

    # ------------------------------------------------------------------ one entry

    def handle(self, entry_id: bytes, fields: dict, deliveries: int) -> None:
        """Take one entry to its end: result + ack, dead letter + ack, or pending for a retry."""
        started = time.perf_counter()
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if deliveries > self.config.max_deliveries:
            # checked before decoding: the decoder itself may be what kills consumers
            self._give_up(eid, fields, deliveries)
            return
        try:
            request, images = decode_request(fields, reward=self.config.reward, limits=self.config.limits)
        except ContractError as e:
            self._outcomes["rejected"].inc()
            peek = peek_request(fields)
            self._dead_letter(eid, fields, e.reason, str(e), deliveries,
                              peek.get("request_id"), peek.get("reply_to"))
            return
        rid = request.request_id
        result_key = self.layout.result_key(rid)
        existing = self.redis.get(result_key)
        if existing is not None:
            self._outcomes["duplicate"].inc()
            self._finish(eid, rid, request.reply_to, notify=existing != RESULT_CONSUMED)
            return
        try:
            output = self.reward_model(images, list(request.prompts))
            result = RewardResult.from_output(rid, self.config.reward, output, len(images),
                                              worker=self.config.consumer)
        except Exception as e:  # any reward failure is retried, then dead-lettered
            self._outcomes["failed"].inc()
            error = f"{type(e).__name__}: {e}"
            log.warning("request %s (entry %s, delivery %d of %d) failed: %s", rid, eid,
                        deliveries, self.config.max_deliveries, error)
            if deliveries >= self.config.max_deliveries:
                self._dead_letter(eid, fields, "max_deliveries", self._failure_message(
                    eid, deliveries, error), deliveries, rid, request.reply_to)
                self._outcomes["dead"].inc()
            else:
                self._retry_soon(eid, error)
            return
        elapsed = time.perf_counter() - started
        result = result.model_copy(update={"elapsed_s": elapsed})
        written = self._write_result(result_key, encode_result(result))
        self._finish(eid, rid, request.reply_to, notify=written)
        if written:
            self._outcomes["ok"].inc()
            self._images.inc(len(images))
            self._seconds.observe(time.perf_counter() - started)
        else:
            self._outcomes["duplicate"].inc()

    def _retry_soon(self, eid: str, error: str) -> None:
        """Note the error (for the dead letter) and backdate the entry's delivery so XAUTOCLAIM
        takes it after retry_after_s; JUSTID leaves its delivery count alone."""
        idle_ms = max(0, int((self.config.claim_idle_s - self.config.retry_after_s) * 1000))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.layout.failure_key(eid), error[:2000], ex=self.config.result_ttl_s)
        pipe.xclaim(self.layout.requests, self.layout.group, self.config.consumer, 0, [eid],
                    idle=idle_ms, justid=True)
        pipe.execute()
        self._claim_cursor = "0-0"  # the next scan must not start past this entry
        self._next_claim = min(self._next_claim, time.monotonic() + self.config.retry_after_s)

    def _give_up(self, eid: str, fields: dict, deliveries: int) -> None:
        """An entry delivered more often than allowed without an ack (its consumers died on it)."""
        peek = peek_request(fields)
        rid, reply_to = peek.get("request_id"), peek.get("reply_to")
        existing = self.redis.get(self.layout.result_key(rid)) if _valid_id(rid) else None
        if existing is not None:  # answered after all; only the ack was lost
            self._outcomes["duplicate"].inc()
            self._finish(eid, rid, reply_to, notify=existing != RESULT_CONSUMED)
            return
        self._dead_letter(eid, fields, "max_deliveries", self._failure_message(
            eid, deliveries, "no result after the earlier deliveries"), deliveries, rid, reply_to)
        self._outcomes["dead"].inc()

    def _write_result(self, key: str, value: bytes) -> bool:
        """SET NX EX: True if this call wrote it; a result or consumed marker already there wins."""
        return bool(self.redis.set(key, value, nx=True, ex=self.config.result_ttl_s))

    def _finish(self, eid: str, request_id: object, reply_to: object, notify: bool) -> None:
        """Notify (if asked and the reply list is one of ours), ack and delete, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        if (notify and _valid_id(request_id) and isinstance(reply_to, str)
                and self.layout.owns_reply_key(reply_to)):
            pipe.lpush(reply_to, request_id)
            pipe.expire(reply_to, self.config.result_ttl_s)
        pipe.xack(self.layout.requests, self.layout.group, eid)
        # one group per stream: an acked entry is of no further use, keep the stream short
        pipe.xdel(self.layout.requests, eid)
        pipe.delete(self.layout.failure_key(eid))
        pipe.execute()

    def _failure_message(self, eid: str, deliveries: int, last: str) -> str:
        noted = self.redis.get(self.layout.failure_key(eid))
        earlier = f"; earlier: {noted.decode(errors='replace')}" if noted and noted.decode(
            errors="replace") != last else ""
        return f"failed {deliveries} deliveries (max {self.config.max_deliveries}): {last}{earlier}"

    def _dead_letter(self, eid: str, fields: dict, reason: str, message: str, deliveries: int,
                     request_id: object, reply_to: object) -> None:
        """Move an entry to the dead-letter stream; tell its client when it can be named."""
        log.warning("dead letter %s (%s): %s", eid, reason, message)
        letter: dict[str, bytes | str | int] = {
            "reason": reason, "error": message, "entry_id": eid, "stream": self.layout.requests,
            "consumer": self.config.consumer, "deliveries": deliveries, "time": f"{time.time():.3f}"}
        for k, v in fields.items():
            letter[f"orig.{k.decode(errors='replace') if isinstance(k, bytes) else k}"] = v
        self.redis.xadd(self.layout.dead, letter, maxlen=self.config.dead_maxlen, approximate=True)
        metrics.SERVICE_DEAD_LETTERS.labels(self.config.reward, reason).inc()
        notify = False
        if _valid_id(request_id):
            error = RewardResult(request_id=request_id, reward=self.config.reward, ok=False,
                                 error=f"{reason}: {message}", worker=self.config.consumer)
            notify = self._write_result(self.layout.result_key(request_id), encode_result(error))
        self._finish(eid, request_id, reply_to, notify)

    def _leave_group(self) -> None:
        """Remove this consumer from the group when it holds nothing (keeps XINFO tidy);
        a consumer with pending entries stays, so they can still be reclaimed."""
        try:
            held = self.redis.xpending_range(self.layout.requests, self.layout.group, "-", "+", 1,
                                             consumername=self.config.consumer)
            if not held:
                self.redis.xgroup_delconsumer(self.layout.requests, self.layout.group,
                                              self.config.consumer)
        except redis.RedisError as e:
            log.warning("could not leave the consumer group cleanly: %s", e)


# ------------------------------------------------------------------ command line


def build_parser(prog: str = "python -m reward_workers.service") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve one reward model from a Redis request stream (consumer group).")
    p.add_argument("--reward", required=True, help="reward kind (reward_workers.registry)")
    p.add_argument("--model-path", default=None, help="weights directory or file (the kind's default if omitted)")
    p.add_argument("--redis-url", required=True,
                   help="redis://[user:password@]host:port/db, or rediss://…?ssl_ca_certs=… for TLS")
    p.add_argument("--stream", default=None, help="request stream (default fmrl:reward:{reward}:requests)")
    p.add_argument("--group", default=None, help="consumer group (default fmrl-reward-{reward})")
    p.add_argument("--dead-stream", default=None, help="dead-letter stream (default fmrl:reward:{reward}:dead)")
    p.add_argument("--consumer", default=None, help="consumer name (default host-pid; unique per process)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics binds to")
    p.add_argument("--claim-idle-s", type=float, default=60.0,
                   help="reclaim entries idle this long in another consumer (longer than the slowest scoring)")
    p.add_argument("--max-deliveries", type=int, default=3, help="deliveries before a dead letter")
    p.add_argument("--retry-after-s", type=float, default=1.0,
                   help="redeliver a request whose scoring raised after this long")
    p.add_argument("--batch", type=int, default=4, help="entries read per XREADGROUP")
    p.add_argument("--block-ms", type=int, default=1000, help="longest wait of one XREADGROUP")
    p.add_argument("--result-ttl-s", type=int, default=3600, help="lifetime of results in Redis")
    return p


def _client_name(consumer: str) -> str:
    return "fmrl-reward-" + re.sub(r"[^A-Za-z0-9_.\-:]", "_", consumer)


def main(argv: Sequence[str] | None = None, prog: str = "python -m reward_workers.service") -> int:
    """Run a reward service until SIGTERM/SIGINT; 0 on a clean stop, 2 on a setup error."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = "reward service"
    try:
        kw = {k: v for k, v in dict(
            reward=args.reward, stream=args.stream, group=args.group, dead_stream=args.dead_stream,
            consumer=args.consumer, batch=args.batch, block_ms=args.block_ms,
            claim_idle_s=args.claim_idle_s, max_deliveries=args.max_deliveries,
            retry_after_s=args.retry_after_s,
            result_ttl_s=args.result_ttl_s).items() if v is not None}
        config = ServiceConfig(**kw)
    except ValidationError as e:
        problems = "; ".join(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}"
                             for err in e.errors(include_url=False))
        print(f"{prog}: error: {problems}", file=sys.stderr)
        return 2
    try:
        client = connect(args.redis_url, client_name=_client_name(config.consumer))
    except (ValueError, RedisUnreachable) as e:
        print(f"{prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from reward_workers.registry import build_reward

    try:
        model = build_reward(args.reward, Path(args.model_path) if args.model_path else None)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"{prog}: error: cannot load reward {args.reward!r}: {e}", file=sys.stderr)
        return 2
    service = RewardService(model, client, config)
    metrics_url = "off"
    if args.metrics_port is not None:
        from prometheus_client import disable_created_metrics, start_http_server

        disable_created_metrics()  # the *_created series only double the scrape
        try:
            start_http_server(args.metrics_port, addr=args.metrics_host)
        except OSError as e:
            print(f"{prog}: error: cannot serve /metrics on {args.metrics_host}:{args.metrics_port}: {e}",
                  file=sys.stderr)
            return 2
        metrics_url = f"http://{args.metrics_host}:{args.metrics_port}/metrics"

    def stop(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        service.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    layout = service.layout
    log.info("reward service %s: stream=%s group=%s consumer=%s dead=%s redis=%s metrics=%s",
             config.reward, layout.requests, layout.group, config.consumer, layout.dead,
             redact_url(args.redis_url), metrics_url)
    try:
        service.run()
    except redis.RedisError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    log.info("reward service %s: stopped", config.reward)
    return 0


if __name__ == "__main__":
    sys.exit(main())

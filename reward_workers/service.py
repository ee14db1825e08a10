"""A reward model as a separate service: a consumer of the reward's Redis request stream.

Reading: entries are taken by a server-side script (XREADGROUP, or XAUTOCLAIM for entries
idle past ``claim_idle_s`` in a dead or stuck consumer) that measures each entry in Redis and
hands over the fields of one larger than ``limits.max_entry_bytes`` only where they are small
(the ``meta`` that names the request): an oversized payload never leaves Redis. Only when that
finds nothing does the service block in XREADGROUP COUNT 1 to wait for work; the one entry such
a wait can deliver is measured on arrival (so at most one entry per wait, itself bounded by
Redis's client-query-buffer-limit, is read before its size is known).

Per stream entry, in this order (each step idempotent, so a crash anywhere only repeats work):

1. measure and decode (contract.py: entry, meta and declared pixel bounds before anything is
   allocated); a broken entry goes to the dead-letter stream with its reason and, when the
   request id and reply list are readable, an error result is written so the client fails fast;
2. if a result (or the consumed marker) already exists under the request id, do not score
   again: if it is bound to this request's content digest, re-notify (the first notification
   may be what was lost) and ack; if to another's (a reused id), dead-letter this entry as
   ``id_reused`` and notify its client, whose own check names the id;
3. score; if the reward raises, leave the entry pending, marked idle enough to be reclaimed
   (by any service) after ``retry_after_s``; dead-letter it once it failed ``max_deliveries``
   deliveries;
4. write the result with SET NX EX (a second processing never overwrites), push the request
   id onto the client's reply list, then XACK and XDEL the entry.

Any other exception while handling one entry (a bug, a decoder surprise) dead-letters that
entry as ``internal`` and the service goes on: one request never takes a worker down.
Redis errors are not caught there: the entry stays pending and is retried or reclaimed.
SIGTERM / SIGINT: finish the batch in hand, ack it, exit 0.

A dead letter (an entry of ``StreamLayout.dead``) has the fields ``reason`` (a
ContractReason, ``max_deliveries`` or ``internal``), ``error`` (the message), ``entry_id``,
``stream``, ``consumer``, ``deliveries``, ``time``, ``request_id`` (when readable), ``bytes``
(the entry's size) and, per original field (the first ``DEAD_FIELDS``), ``orig.<name>.bytes``;
fields other than the images are kept as ``orig.<name>`` up to ``dead_keep_bytes`` in all
(``orig.<name>.truncated`` = 1 where cut). Images are never kept. The stream is trimmed by
count (``dead_maxlen``) and age (``dead_max_age_s``), so it holds at most about
``dead_maxlen × (dead_keep_bytes + 1 KiB)``.

Run: ``python -m reward_workers.service --reward digits_classifier --redis-url redis://...``.
"""

from __future__ import annotations

import argparse
import json
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
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reward_workers import metrics
from reward_workers.base import Reward
from reward_workers.client import RedisUnreachable, check_binary, connect, redact_url
from reward_workers.contract import (
    FIELD_IMAGES,
    REQUEST_ID_PATTERN,
    RESULT_CONSUMED,
    ContractError,
    RequestLimits,
    RewardResult,
    StreamLayout,
    decode_request,
    encode_result,
    entry_digest,
    peek_request,
    stored_digest,
)

log = logging.getLogger(__name__)
_MAX_BACKOFF_S = 10.0
DEAD_FIELDS = 16
"""A dead letter records the sizes of at most this many of the original entry's fields."""

# Takes up to COUNT entries for this consumer (XREADGROUP ">" or XAUTOCLAIM) and measures them
# in Redis. Per entry: {id, deliveries, bytes, n_fields, {name, length, ...} (first DEAD_FIELDS),
# fields}, where an entry over the byte limit keeps only its fields of at most `small` bytes.
# KEYS[1] stream; ARGV: mode ("new" | "claim"), group, consumer, count, limit, small,
# min_idle_ms, start, dead_fields. Returns {next claim cursor, entries}.
_TAKE_SCRIPT = """
local mode, group, consumer, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit, small, nsizes = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[9])
local cursor, entries = '0-0', {}
if mode == 'new' then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', KEYS[1], '>')
  if r then entries = r[1][2] end
else
  local r = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[7], ARGV[8], 'COUNT', count)
  cursor, entries = r[1], r[2]
end
local out = {}
for _, e in ipairs(entries) do
  local id, fields = e[1], e[2]
  if fields then
    local deliveries = 1
    if mode ~= 'new' then
      local p = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
      deliveries = p[1] and p[1][4] or 0
    end
    if deliveries > 0 then
      local total, sizes = 0, {}
      for j = 1, #fields, 2 do
        total = total + #fields[j] + #fields[j + 1]
        if j < 2 * nsizes then
          sizes[#sizes + 1] = fields[j]
          sizes[#sizes + 1] = #fields[j + 1]
        end
      end
      local kept = fields
      if total > limit then
        kept = {}
        for j = 1, #fields, 2 do
          if #fields[j + 1] <= small and #kept < 2 * nsizes then
            kept[#kept + 1] = fields[j]
            kept[#kept + 1] = fields[j + 1]
          end
        end
      end
      out[#out + 1] = {id, deliveries, total, #fields / 2, sizes, kept}
    end
  end
end
return {cursor, out}
"""


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
    dead_maxlen: int = Field(10_000, ge=1, description="most entries kept in the dead-letter stream")
    dead_max_age_s: float = Field(7 * 86400.0, gt=0, description="dead letters older than this "
                                  "are trimmed (by stream id, i.e. Redis's clock)")
    dead_keep_bytes: int = Field(16 * 1024, ge=0, description="bytes of the original entry's "
                                 "non-image fields a dead letter keeps (the images never)")
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
        self._take_script = client.register_script(_TAKE_SCRIPT)

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
        entries = self._take("new")
        if not entries:
            # nothing waiting: block until something comes. What this read delivers is measured
            # only on arrival, so it takes one entry; the script measures all the others
            resp = self.redis.xreadgroup(self.layout.group, self.config.consumer,
                                         {self.layout.requests: ">"}, count=1,
                                         block=self.config.block_ms)
            entries = [_Entry.measured(eid, fields, self.config.limits)
                       for _, batch in (resp or []) for eid, fields in batch]
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

    def _handle_all(self, entries: list[_Entry]) -> int:
        for e in entries:
            self.handle(e.entry_id, e.fields, e.deliveries, size=e.size)
        return len(entries)

    def _take(self, mode: Literal["new", "claim"]) -> list[_Entry]:
        """Up to ``batch`` entries, new or reclaimed, measured in Redis (see _TAKE_SCRIPT)."""
        limits = self.config.limits
        cursor, rows = self._take_script(
            keys=[self.layout.requests],
            args=[mode, self.layout.group, self.config.consumer, self.config.batch,
                  limits.max_entry_bytes, limits.max_meta_bytes,
                  int(self.config.claim_idle_s * 1000), self._claim_cursor, DEAD_FIELDS])
        entries = [_Entry.from_script(row) for row in rows]
        if mode == "claim":
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            if self._claim_cursor != "0-0":
                self._next_claim = 0.0  # more idle entries behind these: claim again next cycle
            if entries:
                self._reclaimed.inc(len(entries))
                log.info("reclaimed %d idle entr%s", len(entries), "y" if len(entries) == 1 else "ies")
        return entries

    def _reclaim(self) -> list[_Entry]:
        """XAUTOCLAIM entries idle past claim_idle_s, with their delivery counts (the claim
        itself counted as one)."""
        return self._take("claim")

    # ------------------------------------------------------------------ one entry

    def handle(self, entry_id: bytes, fields: dict, deliveries: int, size: _Size | None = None) -> None:
        """Take one entry to its end: result + ack, dead letter + ack, or pending for a retry.

        size: what Redis measured (the script); None measures ``fields`` here. An unexpected
        exception dead-letters the entry (reason ``internal``) instead of reaching the loop.
        """
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        size = size or _Size.of(fields)
        try:
            self._handle(eid, fields, deliveries, size)
        except (redis.RedisError, KeyboardInterrupt, SystemExit):
            raise  # the entry stays pending: retried here or reclaimed elsewhere
        except Exception as e:  # a bug or a decoder surprise: this entry's problem, not the worker's
            error = _describe(e)
            log.exception("request entry %s broke the handler: %s", eid, error)
            self._outcomes["rejected"].inc()
            peek = _safe_peek(fields)
            self._dead_letter(eid, fields, "internal", f"unexpected {error}", deliveries,
                              peek.get("request_id"), peek.get("reply_to"), size)

    def _handle(self, eid: str, fields: dict, deliveries: int, size: _Size) -> None:
        started = time.perf_counter()
        if deliveries > self.config.max_deliveries:
            # checked before decoding: the decoder itself may be what kills consumers
            self._give_up(eid, fields, deliveries, size)
            return
        limits = self.config.limits
        try:
            if size.total > limits.max_entry_bytes:
                raise ContractError("too_large", f"stream entry of {size.total} bytes exceeds the "
                                    f"limit of {limits.max_entry_bytes} (images {size.of_field(FIELD_IMAGES)} "
                                    f"bytes, limit {limits.max_bytes})")
            request, images = decode_request(fields, reward=self.config.reward, limits=limits)
        except ContractError as e:
            self._outcomes["rejected"].inc()
            peek = _safe_peek(fields)
            self._dead_letter(eid, fields, e.reason, str(e), deliveries,
                              peek.get("request_id"), peek.get("reply_to"), size)
            return
        rid = request.request_id
        digest = entry_digest(request, fields)
        result_key = self.layout.result_key(rid)
        existing = self.redis.get(result_key)
        if existing is not None:
            bound_to = stored_digest(existing)
            if bound_to and bound_to != digest:
                self._outcomes["rejected"].inc()
                # the key answers another request: leave it; this client learns it from the key
                self._dead_letter(eid, fields, "id_reused", f"request id {rid} was already used "
                                  f"for other images or prompts (digest {bound_to[:16]}…, this "
                                  f"request {digest[:16]}…)", deliveries, rid, request.reply_to,
                                  size, notify=True)
                return
            self._outcomes["duplicate"].inc()
            self._finish(eid, rid, request.reply_to, notify=not existing.startswith(RESULT_CONSUMED))
            return
        try:
            # metadata only when the request carries some: a two-argument reward serves on
            extra = () if request.metadata is None else ([dict(m) for m in request.metadata],)
            output = self.reward_model(images, list(request.prompts), *extra)
            result = RewardResult.from_output(rid, self.config.reward, output, len(images),
                                              worker=self.config.consumer, digest=digest)
        except Exception as e:  # any reward failure is retried, then dead-lettered
            self._outcomes["failed"].inc()
            error = _describe(e)
            log.warning("request %s (entry %s, delivery %d of %d) failed: %s", rid, eid,
                        deliveries, self.config.max_deliveries, error)
            if deliveries >= self.config.max_deliveries:
                self._dead_letter(eid, fields, "max_deliveries", self._failure_message(
                    eid, deliveries, error), deliveries, rid, request.reply_to, size)
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

    def _give_up(self, eid: str, fields: dict, deliveries: int, size: _Size) -> None:
        """An entry delivered more often than allowed without an ack (its consumers died on it)."""
        peek = _safe_peek(fields)
        rid, reply_to = peek.get("request_id"), peek.get("reply_to")
        existing = self.redis.get(self.layout.result_key(rid)) if _valid_id(rid) else None
        if existing is not None:  # answered after all (or refused); only the ack was lost
            self._outcomes["duplicate"].inc()
            self._finish(eid, rid, reply_to, notify=not existing.startswith(RESULT_CONSUMED))
            return
        self._dead_letter(eid, fields, "max_deliveries", self._failure_message(
            eid, deliveries, "no result after the earlier deliveries"), deliveries, rid, reply_to, size)
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
                     request_id: object, reply_to: object, size: _Size, notify: bool = False) -> None:
        """Move an entry's description (not its images) to the dead-letter stream, trimmed by
        count and age; tell its client when it can be named (an error result, or with
        ``notify`` a bare notification: the result key already answers, see id_reused)."""
        log.warning("dead letter %s (%s): %s", eid, reason, message)
        letter: dict[str, bytes | str | int] = {
            "reason": reason, "error": message[:4000], "entry_id": eid, "stream": self.layout.requests,
            "consumer": self.config.consumer, "deliveries": deliveries, "time": f"{time.time():.3f}",
            "bytes": size.total, "fields": size.count}
        if _valid_id(request_id):
            letter["request_id"] = request_id
        for name, length in size.fields[:DEAD_FIELDS]:
            letter[f"orig.{name}.bytes"] = length
        budget = self.config.dead_keep_bytes
        for k, v in list(fields.items())[:DEAD_FIELDS]:
            name = k.decode(errors="replace") if isinstance(k, bytes) else str(k)
            if name == FIELD_IMAGES or budget <= 0:
                continue
            v = v if isinstance(v, bytes) else str(v).encode()
            letter[f"orig.{name}"] = v[:budget]
            if len(v) > budget:
                letter[f"orig.{name}.truncated"] = 1
            budget -= min(len(v), budget)
        # one trim strategy per command: XADD trims by age (MINID), XTRIM by count; exact, as
        # dead letters are rare and an approximate trim leaves up to a whole node of them
        min_id = max(0, int((time.time() - self.config.dead_max_age_s) * 1000))
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.layout.dead, letter, minid=f"{min_id}-0", approximate=False)
        pipe.xtrim(self.layout.dead, maxlen=self.config.dead_maxlen, approximate=False)
        pipe.execute()
        metrics.SERVICE_DEAD_LETTERS.labels(self.config.reward, reason).inc()
        if _valid_id(request_id) and not notify:
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


class _Size:
    """An entry's size: total bytes (names and values), field count, (name, length) per field."""

    __slots__ = ("total", "count", "fields")

    def __init__(self, total: int, count: int, fields: list[tuple[str, int]]) -> None:
        self.total, self.count, self.fields = total, count, fields

    @classmethod
    def of(cls, fields: dict) -> _Size:
        sizes = [(k.decode(errors="replace") if isinstance(k, bytes) else str(k), len(v))
                 for k, v in fields.items()]
        return cls(sum(len(k) + n for k, n in sizes), len(sizes), sizes)

    def of_field(self, name: str) -> int | None:
        return next((n for k, n in self.fields if k == name), None)


class _Entry:
    """One stream entry taken by this consumer, with its delivery count and size."""

    __slots__ = ("entry_id", "fields", "deliveries", "size")

    def __init__(self, entry_id: bytes, fields: dict, deliveries: int, size: _Size) -> None:
        self.entry_id, self.fields, self.deliveries, self.size = entry_id, fields, deliveries, size

    @classmethod
    def from_script(cls, row: list) -> _Entry:
        eid, deliveries, total, count, sizes, kept = row
        pairs = [(sizes[i].decode(errors="replace"), int(sizes[i + 1])) for i in range(0, len(sizes), 2)]
        fields = {kept[i]: kept[i + 1] for i in range(0, len(kept), 2)}
        return cls(eid, fields, int(deliveries), _Size(int(total), int(count), pairs))

    @classmethod
    def measured(cls, entry_id: bytes, fields: dict, limits: RequestLimits) -> _Entry:
        """An entry a blocking read delivered whole: measured here; the payload of one over
        the limit is dropped at once (the handler sees only its small fields)."""
        size = _Size.of(fields)
        if size.total > limits.max_entry_bytes:
            fields = {k: v for k, v in fields.items() if len(v) <= limits.max_meta_bytes}
        return cls(entry_id, fields, 1, size)


def _describe(e: BaseException) -> str:
    """``Type: message`` of an exception, even one whose message cannot be rendered."""
    try:
        text = str(e)
    except Exception:
        text = "<message not printable>"
    return f"{type(e).__name__}: {text}"[:2000]


def _safe_peek(fields: dict) -> dict:
    try:
        return peek_request(fields)
    except Exception:
        return {}


# ------------------------------------------------------------------ command line


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except None (its help text says what it means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(prog: str = "python -m reward_workers.service") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=_Help,
        description="Serve one reward model from a Redis request stream (consumer group).")
    p.add_argument("--reward", required=True, help="reward kind (reward_workers.registry), or python "
                   "with --callable")
    p.add_argument("--model-path", default=None, help="weights directory or file (the kind's default if omitted)")
    p.add_argument("--callable", default=None, metavar="MODULE:FUNCTION",
                   help="with --reward python: the reward function or class, f(images, prompts, metadata) "
                   "(docs/rewards.md); requests name it, so its stream is fmrl:reward:python:MODULE:FUNCTION")
    p.add_argument("--init-kwargs", default=None, metavar="JSON",
                   help="with --reward python and a class: its constructor's keyword arguments, a JSON object")
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
    defaults = RequestLimits()
    p.add_argument("--max-images", type=int, default=defaults.max_images, help="most images in one request")
    p.add_argument("--max-side", type=int, default=defaults.max_side, help="largest image height or width")
    p.add_argument("--max-pixels-per-image", type=int, default=defaults.max_pixels_per_image,
                   help="most pixels (H·W) of one image, checked before decoding")
    p.add_argument("--max-pixels-per-request", type=int, default=defaults.max_pixels_per_request,
                   help="most pixels (N·H·W) in one request, checked before decoding")
    p.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                   help="largest encoded image payload; larger entries are never read out of Redis")
    p.add_argument("--max-meta-bytes", type=int, default=defaults.max_meta_bytes,
                   help="largest request metadata (JSON with the prompts)")
    p.add_argument("--dead-maxlen", type=int, default=10_000, help="most entries kept as dead letters")
    p.add_argument("--dead-max-age-s", type=float, default=7 * 86400.0, help="dead letters older than this are trimmed")
    return p


def _python_args(args: argparse.Namespace) -> tuple[str, dict]:
    """The service's reward name and a python reward's init kwargs; ValueError for a bad mix."""
    from reward_workers.registry import PYTHON, python_wire_name

    if args.reward != PYTHON:
        if args.callable is not None or args.init_kwargs is not None:
            raise ValueError("--callable and --init-kwargs go with --reward python only")
        return args.reward, {}
    if args.callable is None:
        raise ValueError("--reward python needs --callable MODULE:FUNCTION")
    if args.model_path is not None:
        raise ValueError("--reward python takes no --model-path (pass it in --init-kwargs)")
    try:
        init_kwargs = json.loads(args.init_kwargs) if args.init_kwargs is not None else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--init-kwargs is not JSON: {e}") from None
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"--init-kwargs must be a JSON object, got {type(init_kwargs).__name__}")
    return python_wire_name(args.callable), init_kwargs


def _client_name(consumer: str) -> str:
    return "fmrl-reward-" + re.sub(r"[^A-Za-z0-9_.\-:]", "_", consumer)


def main(argv: Sequence[str] | None = None, prog: str = "python -m reward_workers.service") -> int:
    """Run a reward service until SIGTERM/SIGINT; 0 on a clean stop, 2 on a setup error."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = "reward service"
    try:
        reward_name, init_kwargs = _python_args(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        kw = {k: v for k, v in dict(
            reward=reward_name, stream=args.stream, group=args.group, dead_stream=args.dead_stream,
            consumer=args.consumer, batch=args.batch, block_ms=args.block_ms,
            claim_idle_s=args.claim_idle_s, max_deliveries=args.max_deliveries,
            retry_after_s=args.retry_after_s, result_ttl_s=args.result_ttl_s,
            dead_maxlen=args.dead_maxlen, dead_max_age_s=args.dead_max_age_s).items() if v is not None}
        config = ServiceConfig(**kw, limits=RequestLimits(
            max_images=args.max_images, max_side=args.max_side,
            max_pixels_per_image=args.max_pixels_per_image,
            max_pixels_per_request=args.max_pixels_per_request, max_bytes=args.max_bytes,
            max_meta_bytes=args.max_meta_bytes))
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
    from reward_workers.registry import PYTHON, build_python_reward, build_reward

    try:
        if args.reward == PYTHON:
            model = build_python_reward(args.callable, init_kwargs, name=reward_name)
        else:
            model = build_reward(args.reward, Path(args.model_path) if args.model_path else None)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"{prog}: error: cannot load reward {reward_name!r}: {e}", file=sys.stderr)
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

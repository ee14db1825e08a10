"""The Redis reward service and its client against a real redis-server (tests/conftest.py).

Worker processes are real `python -m reward_workers.service` subprocesses; the other tests run
a RewardService on a thread of the test process, which is quicker to start.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from reward_workers.client import (
    RedisUnreachable,
    RewardClient,
    RewardError,
    RewardUnavailable,
    connect,
)
from reward_workers.contract import (
    RESULT_CONSUMED,
    RequestLimits,
    StreamLayout,
    consumed_marker,
    encode_request,
    request_digest,
)
from reward_workers.digits import DIGIT_WORDS, DigitsClassifierReward, load_split
from reward_workers.service import RewardService, ServiceConfig, main
from tests.conftest import free_port, scrape_metrics

ROOT = Path(__file__).resolve().parents[2]
REWARD = "digits_classifier"
LAYOUT = StreamLayout.for_reward(REWARD)


@pytest.fixture(scope="module")
def digits():
    """Held-out digit images (N, 8, 8, 1) with prompts; every fifth prompt names a wrong digit
    so scores spread over (0, 1)."""
    split = load_split()
    labels = [(y + 1) % 10 if i % 5 == 0 else y for i, y in enumerate(split.heldout_labels)]
    return split.heldout_images[..., None], [f"a handwritten {DIGIT_WORDS[y]}" for y in labels]


@pytest.fixture(scope="module")
def reward_model():
    return DigitsClassifierReward()


def sample(name, labels=None):
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@contextmanager
def serving(url, reward_model, **config):
    """A RewardService on a thread of this process."""
    cfg = dict(reward=REWARD, block_ms=100, consumer="thread-worker") | config
    service = RewardService(reward_model, connect(url), ServiceConfig(**cfg))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop_event.set()
        thread.join(10)
        assert not thread.is_alive(), "the service thread did not stop"


class Workers:
    """`python -m reward_workers.service` subprocesses of one test; killed at its end."""

    def __init__(self, url, tmp_path):
        self.url, self.tmp_path, self.procs = url, tmp_path, {}

    def start(self, consumer, *args):
        log = open(self.tmp_path / f"{consumer}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "reward_workers.service", "--reward", REWARD, "--redis-url", self.url,
             "--consumer", consumer, "--block-ms", "200", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[consumer] = proc
        return proc

    def log(self, consumer):
        return (self.tmp_path / f"{consumer}.log").read_text(errors="replace")

    def wait_blocked(self, r, consumer, timeout=60):
        """Until the worker waits in XREADGROUP (it is up and holds nothing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[consumer].poll() is not None:
                pytest.fail(f"worker {consumer} exited early:\n{self.log(consumer)[-3000:]}")
            if self.is_blocked(r, consumer):
                return
            time.sleep(0.05)
        pytest.fail(f"worker {consumer} not serving after {timeout} s:\n{self.log(consumer)[-3000:]}")

    @staticmethod
    def is_blocked(r, consumer):
        return any(c["name"] == f"fmrl-reward-{consumer}" and c["cmd"] == "xreadgroup"
                   and "b" in c["flags"] for c in r.client_list())

    def kill_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(redis_url, tmp_path):
    w = Workers(redis_url, tmp_path)
    yield w
    w.kill_all()


def assert_all_consumed_once(r, n_requests):
    """Every request has exactly one result key, taken by its client, and nothing is left over."""
    keys = list(r.scan_iter(LAYOUT.result_key("*")))
    assert len(keys) == n_requests
    assert all(v.startswith(RESULT_CONSUMED) for v in r.mget(keys)), "a result was never consumed"
    assert r.xlen(LAYOUT.requests) == 0
    assert r.xpending(LAYOUT.requests, LAYOUT.group)["pending"] == 0
    assert r.xlen(LAYOUT.dead) == 0


# The digits CNN scores in float32: its probabilities move by a few 1e-7 with the batch size
# (a worker scores 4 images, the reference 320) and the torch thread count (a worker process vs
# this one), so scores are compared at float32 tolerance. A request scored with another's images
# or prompts would be off by far more: these scores spread over (0, 1).
SCORE_TOL = dict(rtol=1e-5, atol=1e-5)


def assert_same_scores(out, reward_model, images, prompts):
    ref = reward_model(images, prompts)
    np.testing.assert_allclose(out.scores, ref.scores, **SCORE_TOL)
    assert out.details.keys() == ref.details.keys()
    # pred (an argmax) is compared exactly: on these held-out digits the top two probabilities
    # are at least 0.08 apart, far beyond float32 noise
    for k in ref.details:
        np.testing.assert_array_equal(out.details[k], ref.details[k])


# ------------------------------------------------------------------ worker processes


def test_workers_killed_or_replaced_mid_run_lose_nothing(redis_url, workers, digits, reward_model):
    """Two phases on the same stream, sharing worker B (each worker start costs seconds of CPU):

    1. workers A and B; A is SIGKILLed while it holds pending entries; B reclaims them;
    2. B is replaced mid-stream: SIGTERM (it finishes its batch, acks, exits 0), C takes over.
    Each time every request is scored once, its result consumed once, scores as in-process.
    """
    r = redis.Redis.from_url(redis_url)
    port = free_port()
    common = ("--claim-idle-s", "1", "--batch", "2")
    workers.start("w-a", *common, "--block-ms", "4000")
    workers.start("w-b", *common, "--metrics-port", str(port))
    workers.wait_blocked(r, "w-b")

    # -- phase 1: freeze A inside its blocking XREADGROUP: Redis still hands it entries, which
    # it never acks; then SIGKILL it
    for _ in range(5):
        workers.wait_blocked(r, "w-a")
        os.kill(workers.procs["w-a"].pid, signal.SIGSTOP)
        if workers.is_blocked(r, "w-a"):
            break
        os.kill(workers.procs["w-a"].pid, signal.SIGCONT)  # stopped between two reads: again
    else:
        pytest.fail("could not freeze worker A inside XREADGROUP")
    images, prompts = digits[0][:320], digits[1][:320]
    client = RewardClient(redis_url, REWARD, max_images_per_request=4, max_in_flight=8,
                          timeout_s=10, attempts=3, encoding="raw")
    got = {}
    run = threading.Thread(target=lambda: got.update(out=client.score(images, prompts)))
    run.start()
    deadline = time.monotonic() + 20
    while not (held := r.xpending_range(LAYOUT.requests, LAYOUT.group, "-", "+", 10, consumername="w-a")):
        assert time.monotonic() < deadline, "worker A never received an entry"
        time.sleep(0.01)
    workers.procs["w-a"].kill()
    workers.procs["w-a"].wait()
    run.join(60)
    assert not run.is_alive(), "the client did not finish"
    assert got["out"].scores.shape == (320,)
    assert_same_scores(got["out"], reward_model, images, prompts)
    assert_all_consumed_once(r, 80)

    # B's /metrics: the declared families with their types; it scored and took over A's entries
    families = scrape_metrics(port)
    expected = {"fmrl_reward_service_requests": "counter", "fmrl_reward_service_images": "counter",
                "fmrl_reward_service_request_seconds": "histogram",
                "fmrl_reward_service_dead_letters": "counter", "fmrl_reward_service_reclaimed": "counter"}
    assert {name: families[name].type for name in expected} == expected
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    ok = samples[("fmrl_reward_service_requests_total", (("outcome", "ok"), ("reward", REWARD)))]
    reclaimed = samples[("fmrl_reward_service_reclaimed_total", (("reward", REWARD),))]
    assert ok >= len(held) and reclaimed >= len(held)
    assert samples[("fmrl_reward_service_images_total", (("reward", REWARD),))] == 4 * ok
    assert samples[("fmrl_reward_service_request_seconds_count", (("reward", REWARD),))] == ok

    # -- phase 2: a stream of small batches, as a training loop sends them; B is replaced by C
    # after ten. C's long claim timeout: nothing may be rescued by XAUTOCLAIM, only by B's clean exit
    client = RewardClient(redis_url, REWARD, max_images_per_request=4, timeout_s=45, attempts=2)
    outs, ten_done = [], threading.Event()

    def drive():
        for i in range(40):
            outs.append(client.score(images[8 * i:8 * i + 8], prompts[8 * i:8 * i + 8]))
            if i == 9:
                ten_done.set()
            time.sleep(0.02)

    run = threading.Thread(target=drive)
    run.start()
    assert ten_done.wait(30)
    workers.start("w-c", "--claim-idle-s", "600")
    workers.procs["w-b"].send_signal(signal.SIGTERM)
    assert workers.procs["w-b"].wait(15) == 0, workers.log("w-b")[-3000:]
    assert "finishing the batch in hand" in workers.log("w-b")
    # it acked everything it took and left the group: nothing of it waits to be reclaimed
    consumers = {c["name"] for c in r.xinfo_consumers(LAYOUT.requests, LAYOUT.group)}
    assert b"w-b" not in consumers
    run.join(90)
    assert not run.is_alive(), f"the client did not finish:\n{workers.log('w-c')[-3000:]}"
    assert len(outs) == 40
    np.testing.assert_allclose(np.concatenate([o.scores for o in outs]),
                               reward_model(images, prompts).scores, **SCORE_TOL)
    assert_all_consumed_once(r, 160)
    assert "consumer=w-c" in workers.log("w-c")  # its start line names stream, group, consumer
    workers.procs["w-c"].send_signal(signal.SIGTERM)
    assert workers.procs["w-c"].wait(15) == 0


# ------------------------------------------------------------------ failures and dead letters


def test_malformed_requests_go_to_the_dead_letter_stream(redis_url, reward_model, digits):
    r = redis.Redis.from_url(redis_url)
    reply_to = LAYOUT.reply_key("tester")

    def fields(**kw):
        return encode_request(digits[0][:2], digits[1][:2], reward=REWARD, request_id=kw.pop("rid"),
                              reply_to=reply_to, encoding="raw", **kw)[1]

    good = fields(rid="ok-1")
    meta = json.loads(good["meta"])
    sent = {
        "garbage": {"foo": b"bar"},
        "bad_json": {"meta": b"{nope", "images": b""},
        "truncated": {**fields(rid="short-1"), "images": good["images"][:50]},
        "shape": {"meta": json.dumps(meta | {"request_id": "shape-1", "images": meta["images"] | {
            "shape": [2, 16, 16, 1]}}).encode(), "images": good["images"]},
        "wrong_reward": {"meta": json.dumps(meta | {"request_id": "other-1", "reward": "clip"}).encode(),
                         "images": good["images"]},
        "version": {"meta": json.dumps(meta | {"request_id": "v2-1", "schema_version": 2}).encode(),
                    "images": good["images"]},
    }
    for f in sent.values():
        r.xadd(LAYOUT.requests, f)
    before = sample("fmrl_reward_service_dead_letters_total", {"reward": REWARD, "reason": "bad_images"})
    with serving(redis_url, reward_model):
        deadline = time.monotonic() + 10
        while r.xlen(LAYOUT.dead) < len(sent):
            assert time.monotonic() < deadline, r.xrange(LAYOUT.dead)
            time.sleep(0.02)
    letters = [{k.decode(): v for k, v in f.items()} for _, f in r.xrange(LAYOUT.dead)]
    got = [(f["reason"].decode(), f["error"].decode()) for f in letters]
    assert got[0] == ("malformed", "entry needs fields 'meta' and 'images', got ['foo']")
    assert got[1][0] == "malformed" and "'meta' is not JSON" in got[1][1]
    assert got[2] == ("bad_images", "raw images of shape (2, 8, 8, 1) need 128 bytes, got 50 (truncated)")
    assert got[3] == ("bad_images", "raw images of shape (2, 16, 16, 1) need 512 bytes, got 128 (truncated)")
    assert got[4] == ("wrong_reward", "request other-1 asks for reward 'clip' but this service scores "
                      "'digits_classifier'")
    assert got[5] == ("schema_version", "unsupported schema_version 2; this service speaks 1")
    # small fields are kept, images only as their size
    assert letters[0]["orig.foo"] == b"bar" and letters[0]["orig.foo.bytes"] == b"3"
    assert "orig.images" not in letters[2] and letters[2]["orig.images.bytes"] == b"50"
    assert letters[2]["request_id"] == b"short-1" and json.loads(letters[2]["orig.meta"])["request_id"] == "short-1"
    assert sample("fmrl_reward_service_dead_letters_total",
                  {"reward": REWARD, "reason": "bad_images"}) - before == 2
    # the requests whose id and reply list were readable got an error result, and were notified
    for rid in ("short-1", "shape-1", "other-1", "v2-1"):
        result = json.loads(r.get(LAYOUT.result_key(rid)))
        assert result["ok"] is False and result["error"]
    assert sorted(r.lrange(reply_to, 0, -1)) == sorted([b"short-1", b"shape-1", b"other-1", b"v2-1"])
    assert r.xlen(LAYOUT.requests) == 0 and r.xpending(LAYOUT.requests, LAYOUT.group)["pending"] == 0


def test_client_fails_fast_on_an_error_result(redis_url, reward_model, digits):
    # a client for another reward pointed at this stream: rejected, and told so at once
    with serving(redis_url, reward_model):
        client = RewardClient(redis_url, "clip_score", stream=LAYOUT.requests, timeout_s=30)
        t0 = time.monotonic()
        with pytest.raises(RewardError, match="wrong_reward: request .* asks for reward 'clip_score' "
                           "but this service scores 'digits_classifier'"):
            client.score(digits[0][:4], digits[1][:4])
        assert time.monotonic() - t0 < 5


def test_poison_request_is_dead_lettered_after_max_deliveries(redis_url, reward_model):
    r = redis.Redis.from_url(redis_url)
    labels = {"reward": REWARD, "outcome": "failed"}
    failed_before = sample("fmrl_reward_service_requests_total", labels)
    # 16×16 images pass the contract but the digits reward rejects them: it fails on every delivery
    images = np.zeros((2, 16, 16, 1), np.uint8)
    # a long claim timeout: the retries come from retry_after_s, not from waiting for a reclaim
    with serving(redis_url, reward_model, claim_idle_s=60, retry_after_s=0.2, max_deliveries=3):
        client = RewardClient(redis_url, REWARD, timeout_s=20)
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=r"max_deliveries: failed 3 deliveries \(max 3\): "
                           r"ValueError: digits rewards take 8×8 images"):
            client.score(images, ["a handwritten one"] * 2)
        assert time.monotonic() - t0 < 10
    (_, letter), = r.xrange(LAYOUT.dead)
    assert letter[b"reason"] == b"max_deliveries" and letter[b"deliveries"] == b"3"
    assert sample("fmrl_reward_service_requests_total", labels) - failed_before == 3
    assert r.xlen(LAYOUT.requests) == 0 and r.xpending(LAYOUT.requests, LAYOUT.group)["pending"] == 0
    assert not list(r.scan_iter(LAYOUT.failure_key("*")))


def test_processing_a_request_twice_never_overwrites_or_duplicates(redis_url, reward_model, digits):
    r = redis.Redis.from_url(redis_url)
    reply_to = LAYOUT.reply_key("tester")
    request, fields = encode_request(digits[0][:3], digits[1][:3], reward=REWARD, request_id="twice",
                                     reply_to=reply_to)
    first = RewardService(reward_model, connect(redis_url), ServiceConfig(reward=REWARD, consumer="first"))
    second = RewardService(reward_model, connect(redis_url), ServiceConfig(reward=REWARD, consumer="second"))
    first.ensure_group()
    eid = r.xadd(LAYOUT.requests, fields)
    # both read it (the second as if it had reclaimed it from a stalled first)
    r.xreadgroup(LAYOUT.group, "first", {LAYOUT.requests: ">"})
    first.handle(eid, {k.encode(): v for k, v in fields.items()}, 1)
    stored = r.get(LAYOUT.result_key("twice"))
    assert json.loads(stored)["worker"] == "first"
    assert json.loads(stored)["digest"] == request_digest(request, fields["images"])
    second.handle(eid, {k.encode(): v for k, v in fields.items()}, 2)
    assert r.get(LAYOUT.result_key("twice")) == stored  # not overwritten
    assert r.lrange(reply_to, 0, -1) == [b"twice", b"twice"]  # re-notified, not rescored
    # the client takes it (as RewardClient does: swap in the consumed marker, atomically) ...
    marker = consumed_marker(request_digest(request, fields["images"]))
    assert r.set(LAYOUT.result_key("twice"), marker, xx=True, keepttl=True, get=True) == stored
    r.delete(reply_to)
    # ... and a third processing after that neither writes nor notifies
    second.handle(eid, {k.encode(): v for k, v in fields.items()}, 3)
    assert r.get(LAYOUT.result_key("twice")) == marker and r.llen(reply_to) == 0


def test_without_a_worker_optional_returns_none_and_required_raises(redis_url, digits):
    r = redis.Redis.from_url(redis_url)
    images, prompts = digits[0][:6], digits[1][:6]
    unavailable = {"reward": REWARD, "kind": "unavailable"}
    before = sample("fmrl_reward_client_errors_total", unavailable)
    optional = RewardClient(redis_url, REWARD, required=False, timeout_s=0.2, attempts=2,
                            max_images_per_request=4)
    t0 = time.monotonic()
    assert optional.score(images, prompts) is None
    assert 0.4 <= time.monotonic() - t0 < 3
    assert sample("fmrl_reward_client_errors_total", unavailable) - before == 1
    assert sample("fmrl_reward_client_errors_total", {"reward": REWARD, "kind": "timeout"}) >= 2

    required = RewardClient(redis_url, REWARD, timeout_s=0.2, attempts=2)
    with pytest.raises(RewardUnavailable, match=r"reward 'digits_classifier' unavailable: no result "
                       r"for request \w+ on stream 'fmrl:reward:digits_classifier:requests' after "
                       r"2 attempt\(s\) of 0.2 s \([\d.]+ s waited\)") as e:
        required.score(images, prompts)
    assert e.value.reward == REWARD and e.value.stream == LAYOUT.requests
    # what nobody waits for is withdrawn: no entry left to score, results pre-marked consumed
    assert r.xlen(LAYOUT.requests) == 0
    assert all(v.startswith(RESULT_CONSUMED) for v in r.mget(list(r.scan_iter(LAYOUT.result_key("*")))))
    assert sample("fmrl_reward_client_in_flight", {"reward": REWARD}) == 0


def test_resubmission_collapses_with_a_late_original(redis_url, reward_model, digits):
    # the first attempt expires before any service runs; the service that then starts sees
    # only the resubmission (same id) and the client gets exactly one result
    r = redis.Redis.from_url(redis_url)
    client = RewardClient(redis_url, REWARD, timeout_s=0.3, attempts=20)
    got = {}
    run = threading.Thread(target=lambda: got.update(out=client.score(digits[0][:4], digits[1][:4])))
    run.start()
    time.sleep(0.8)
    with serving(redis_url, reward_model):
        run.join(20)
    assert_same_scores(got["out"], reward_model, digits[0][:4], digits[1][:4])
    assert_all_consumed_once(r, 1)
    assert sample("fmrl_reward_client_errors_total", {"reward": REWARD, "kind": "timeout"}) >= 2


# ------------------------------------------------------------------ connections: auth, TLS, errors


def test_acl_user_with_password(redis_factory, reward_model, digits, capsys):
    server = redis_factory("--user", "default", "off", "--user", "scorer", "on", ">s3cret", "~*", "&*", "+@all")
    url = f"redis://scorer:s3cret@127.0.0.1:{server.port}/0"
    with serving(url, reward_model):
        out = RewardClient(url, REWARD, timeout_s=10).score(digits[0][:4], digits[1][:4])
    assert_same_scores(out, reward_model, digits[0][:4], digits[1][:4])

    wrong = f"redis://scorer:wrong@127.0.0.1:{server.port}/0"
    with pytest.raises(RedisUnreachable, match=r"Redis at redis://scorer:\*\*\*@127.0.0.1:\d+/0 "
                       "rejected the credentials") as e:
        RewardClient(wrong, REWARD)
    assert "wrong" not in str(e.value)
    assert main(["--reward", REWARD, "--redis-url", wrong]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reward service: error: Redis at redis://scorer:***@") and "\n" not in err
    assert "rejected the credentials" in err and "wrong" not in err
    assert main(["--reward", REWARD, "--redis-url", f"redis://127.0.0.1:{server.port}/0"]) == 2
    assert "requires authentication; put user:password@ in the URL" in capsys.readouterr().err


def test_unreachable_redis_and_bad_urls_are_one_line_errors(capsys):
    assert main(["--reward", REWARD, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reward service: error: cannot reach Redis at redis://127.0.0.1:")
    assert err.count("\n") == 1 and "Connection refused" in err
    assert main(["--reward", REWARD, "--redis-url", "http://127.0.0.1:1/0"]) == 2
    assert "bad Redis URL 'http://127.0.0.1:1/0': Redis URL must specify one of the following schemes" in \
        capsys.readouterr().err
    assert main(["--reward", REWARD, "--redis-url", "redis://x", "--max-deliveries", "0"]) == 2
    assert "--max-deliveries: Input should be greater than or equal to 1" in capsys.readouterr().err


def _make_tls_files(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (EC keys: fast to make)."""
    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=fmrl test CA")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


def test_tls_rediss_url(redis_factory, reward_model, digits, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed: cannot make a test certificate (TLS NOT tested)")
    files = _make_tls_files(tmp_path)
    tls_port = free_port()
    server = redis_factory("--tls-port", str(tls_port), "--tls-cert-file", str(files["cert"]),
                           "--tls-key-file", str(files["key"]), "--tls-ca-cert-file", str(files["ca"]),
                           "--tls-auth-clients", "no", ready_port=tls_port)
    assert server.proc.poll() is None, "redis-server refused the TLS options (built without TLS?)"
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={files['ca']}"
    with serving(url, reward_model):
        out = RewardClient(url, REWARD, timeout_s=10).score(digits[0][:4], digits[1][:4])
    assert_same_scores(out, reward_model, digits[0][:4], digits[1][:4])
    # the server really speaks TLS: without our CA the certificate is not trusted
    with pytest.raises(RedisUnreachable, match="certificate verify failed"):
        connect(f"rediss://127.0.0.1:{tls_port}/0")


def test_the_service_reports_its_queue_depth_and_pending_entries(redis_url, reward_model):
    r = redis.Redis.from_url(redis_url)
    service = RewardService(reward_model, connect(redis_url), ServiceConfig(reward=REWARD, consumer="q"))
    service.ensure_group()
    for i in range(5):
        r.xadd(LAYOUT.requests, {"probe": str(i)})
    assert service.sample_queue() == (5, 0)
    r.xreadgroup(LAYOUT.group, "holder", {LAYOUT.requests: ">"}, count=2)  # delivered, never acked
    assert service.sample_queue() == (3, 2)
    assert sample("fmrl_reward_service_queue_depth", {"reward": REWARD}) == 3
    assert sample("fmrl_reward_service_pending_entries", {"reward": REWARD}) == 2
    r.xack(LAYOUT.requests, LAYOUT.group, *[eid for _, entries in r.xreadgroup(
        LAYOUT.group, "holder", {LAYOUT.requests: "0"}) for eid, _ in entries])
    assert service.sample_queue() == (3, 0)
    r.delete(LAYOUT.requests)  # Redis lost its data: nothing to report, and the service goes on
    assert service.sample_queue() == (None, 0)


def test_a_service_whose_stream_and_group_vanish_recreates_them_and_serves_on(redis_url, reward_model, digits):
    """Redis lost its data (a restart without persistence): the service recreates its stream and
    group, its queue sampling copes, and the next request is scored as in-process."""
    images, prompts = digits[0][:6], digits[1][:6]
    r = redis.Redis.from_url(redis_url)
    with serving(redis_url, reward_model) as service:
        client = RewardClient(redis_url, REWARD, timeout_s=30)
        assert_same_scores(client.score(images, prompts), reward_model, images, prompts)
        r.flushdb()
        service._next_queue_sample = 0.0  # sample the (missing) queue in the next cycle
        assert_same_scores(client.score(images, prompts), reward_model, images, prompts)
        assert r.exists(LAYOUT.requests) and service.sample_queue() == (0, 0)
        client.close()


# ------------------------------------------------------------------ hostile requests


def wait_for(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def dead_letters(r):
    return [{k.decode(): v for k, v in f.items()} for _, f in r.xrange(LAYOUT.dead)]


def zero_pngs(n, side):
    """n zero-filled side×side grey PNGs: a few kB each on the wire, side² bytes decoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", compress_level=9)
    return [buf.getvalue()] * n


def test_declared_pixels_past_the_limit_are_refused_before_any_allocation(redis_url, reward_model):
    """5 zero PNGs of 4096² (80 kB on the wire, 80 MiB decoded; the issue's case is 256 of
    them, 12 GiB): refused from the declared shape, with no allocation near the decoded size."""
    import tracemalloc

    r = redis.Redis.from_url(redis_url)
    pngs = zero_pngs(5, 4096)
    _, small = encode_request(np.zeros((1, 8, 8, 1), np.uint8), ["a handwritten one"], reward=REWARD,
                              request_id="huge-1", reply_to=LAYOUT.reply_key("tester"), encoding="png")
    meta = json.loads(small["meta"])
    meta["prompts"] = ["a handwritten one"] * 5
    meta["images"] |= {"shape": [5, 4096, 4096, 1], "lengths": [len(p) for p in pngs]}
    fields = {b"meta": json.dumps(meta).encode(), b"images": b"".join(pngs)}
    service = RewardService(reward_model, connect(redis_url), ServiceConfig(reward=REWARD, consumer="t"))
    service.ensure_group()
    eid = r.xadd(LAYOUT.requests, fields)
    tracemalloc.start()
    try:
        service.handle(eid, fields, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # numpy reports its buffers to tracemalloc: the 80 MiB output array was never made
    assert peak < 8 * 2**20, f"peak {peak} bytes"
    (letter,) = dead_letters(r)
    assert letter["reason"] == b"too_large" and letter["deliveries"] == b"1"
    assert b"5 images of 4096\xc3\x974096 = 83886080 pixels exceed the limit of 67108864" in letter["error"]
    assert json.loads(r.get(LAYOUT.result_key("huge-1")))["ok"] is False


def test_an_entry_over_the_byte_limit_is_never_read_out_of_redis(redis_url, reward_model, digits):
    """An 8 MiB payload against a 1 MiB limit: measured and dead-lettered inside Redis; the
    worker reads its small meta (to tell the client) but never its images."""
    r = redis.Redis.from_url(redis_url)
    request, fields = encode_request(digits[0][:2], digits[1][:2], reward=REWARD, request_id="fat-1",
                                     reply_to=LAYOUT.reply_key("tester"), encoding="raw")
    fields["images"] = bytes(8 * 2**20)
    limits = RequestLimits(max_bytes=2**20)
    service = RewardService(reward_model, connect(redis_url),
                            ServiceConfig(reward=REWARD, consumer="t", limits=limits, block_ms=10))
    service.ensure_group()
    r.xadd(LAYOUT.requests, fields)
    sent_before = r.info("stats")["total_net_output_bytes"]
    assert service.step() == 1
    sent = r.info("stats")["total_net_output_bytes"] - sent_before
    assert sent < 2**20, f"Redis sent {sent} bytes while the service handled an 8 MiB entry"
    (letter,) = dead_letters(r)
    assert letter["reason"] == b"too_large" and letter["request_id"] == b"fat-1"
    assert letter["orig.images.bytes"] == str(8 * 2**20).encode() and "orig.images" not in letter
    assert int(letter["bytes"]) > 8 * 2**20
    assert b"exceeds the limit of" in letter["error"]
    result = json.loads(r.get(LAYOUT.result_key("fat-1")))
    assert result["ok"] is False and result["error"].startswith("too_large: stream entry of")
    assert r.lrange(LAYOUT.reply_key("tester"), 0, -1) == [b"fat-1"]
    assert r.xlen(LAYOUT.requests) == 0 and r.xpending(LAYOUT.requests, LAYOUT.group)["pending"] == 0


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this exception's message cannot be rendered")


class Booby:
    """The digits reward, except that a prompt naming 'poison' raises an exception whose
    message itself raises (as some C extensions' do)."""

    name = REWARD

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, images, prompts):
        if any("poison" in p for p in prompts):
            raise Unprintable()
        return self.inner(images, prompts)


def test_unexpected_exceptions_dead_letter_the_request_and_the_worker_serves_on(
        redis_url, reward_model, digits, monkeypatch):
    """Three requests that broke the old handler (and so killed its worker, then each replacement
    that reclaimed them): a scorer exception that cannot be printed, a meta nested deeper than
    the JSON parser recurses, a decoder bug. Each is dead-lettered with a reason; the same worker
    then scores a normal request."""
    import reward_workers.service as service_module

    r = redis.Redis.from_url(redis_url)
    images, prompts = digits[0][:4], digits[1][:4]
    reply_to = LAYOUT.reply_key("tester")
    real_decode = service_module.decode_request

    def buggy_decode(fields, **kw):
        if b"decoder-bug" in fields.get(b"meta", b""):
            return {}["a decoder bug"]
        return real_decode(fields, **kw)

    monkeypatch.setattr(service_module, "decode_request", buggy_decode)
    _, poison = encode_request(images[:2], ["a poison one"] * 2, reward=REWARD, request_id="poison-1",
                               reply_to=reply_to, encoding="raw")
    _, bug = encode_request(images[:2], prompts[:2], reward=REWARD, request_id="decoder-bug",
                            reply_to=reply_to, encoding="raw")
    with serving(redis_url, Booby(reward_model), max_deliveries=1) as service:
        r.xadd(LAYOUT.requests, poison)
        r.xadd(LAYOUT.requests, {"meta": b"[" * 100_000, "images": b""})
        r.xadd(LAYOUT.requests, bug)
        wait_for(lambda: r.xlen(LAYOUT.dead) == 3, "three dead letters")
        out = RewardClient(redis_url, REWARD, timeout_s=20, attempts=1).score(images, prompts)
        assert_same_scores(out, reward_model, images, prompts)
        assert service.stop_event.is_set() is False
    letters = dead_letters(r)
    assert [(f["reason"], f.get("request_id")) for f in letters] == [
        (b"max_deliveries", b"poison-1"), (b"malformed", None), (b"internal", b"decoder-bug")]
    assert letters[0]["error"].endswith(b"Unprintable: <message not printable>")
    assert letters[1]["error"] == b"'meta' is not JSON: nested too deeply"
    assert letters[1]["orig.meta.bytes"] == b"100000" and letters[1]["orig.meta.truncated"] == b"1"
    assert letters[2]["error"] == b"unexpected KeyError: 'a decoder bug'"
    for rid in ("poison-1", "decoder-bug"):  # their client was told
        assert json.loads(r.get(LAYOUT.result_key(rid)))["ok"] is False
    assert r.xlen(LAYOUT.requests) == 0 and r.xpending(LAYOUT.requests, LAYOUT.group)["pending"] == 0


def test_dead_letters_keep_reasons_ids_and_sizes_not_images_and_are_bounded(redis_url, reward_model):
    """Twelve 8 MiB requests the reward rejects (16×16 images for an 8×8 model): the dead-letter
    stream keeps what explains them in a few kB, by count (dead_maxlen) and age."""
    r = redis.Redis.from_url(redis_url)
    images = np.zeros((32, 512, 512, 1), np.uint8)  # 8 MiB raw, within every request limit
    r.xadd(LAYOUT.dead, {"reason": "ancient"}, id="1-0")  # a letter from 1970: past any age limit
    for i in range(12):
        _, fields = encode_request(images, ["a handwritten one"] * 32, reward=REWARD,
                                   request_id=f"big-{i}", reply_to=LAYOUT.reply_key("t"), encoding="raw")
        r.xadd(LAYOUT.requests, fields)
    with serving(redis_url, reward_model, max_deliveries=1, dead_maxlen=10, dead_max_age_s=86400):
        wait_for(lambda: r.xlen(LAYOUT.requests) == 0 and not r.xpending(
            LAYOUT.requests, LAYOUT.group)["pending"], "the requests to be handled", timeout=120)
    letters = dead_letters(r)
    assert len(letters) == 10 and all(f["reason"] == b"max_deliveries" for f in letters)  # 1970 went first
    assert [f["request_id"] for f in letters] == [f"big-{i}".encode() for i in range(2, 12)]
    for f in letters:
        assert f["orig.images.bytes"] == str(8 * 2**20).encode() and "orig.images" not in f
        assert json.loads(f["orig.meta"])["images"]["shape"] == [32, 512, 512, 1]
        assert b"digits rewards take 8\xc3\x978 images" in f["error"]
    usage = r.memory_usage(LAYOUT.dead)
    assert usage < 64 * 1024, f"the dead-letter stream takes {usage} bytes"
    assert r.info("memory")["used_memory"] < 64 * 2**20  # the 96 MiB of images are gone


def test_a_request_id_reused_for_other_images_is_refused_by_name(redis_url, reward_model, digits, monkeypatch):
    """Request 'dup' is scored; then another client sends other images under the same id: it gets
    an error naming the id (not the first request's scores), and the first result is untouched;
    the same once the first client has taken its result."""
    import types

    import reward_workers.client as client_module

    r = redis.Redis.from_url(redis_url)
    images, prompts = digits[0][:4], digits[1][:4]
    first, fields = encode_request(images[:2], prompts[:2], reward=REWARD, request_id="dup",
                                   reply_to=LAYOUT.reply_key("first"), encoding="raw")
    monkeypatch.setattr(client_module, "uuid", types.SimpleNamespace(uuid4=lambda: types.SimpleNamespace(hex="dup")))
    with serving(redis_url, reward_model):
        r.xadd(LAYOUT.requests, fields)
        wait_for(lambda: r.exists(LAYOUT.result_key("dup")), "the first result")
        stored = r.get(LAYOUT.result_key("dup"))
        second = RewardClient(redis_url, REWARD, timeout_s=20, client_id="second")
        with pytest.raises(RewardError, match=r"failed request dup: id_reused: request id dup was "
                           r"already used for other images or prompts"):
            second.score(images[2:4], prompts[2:4])
        assert r.get(LAYOUT.result_key("dup")) == stored  # still there for its owner
        # its owner takes it; a third request under the id is refused just the same
        r.set(LAYOUT.result_key("dup"), consumed_marker(request_digest(first, fields["images"])), xx=True)
        with pytest.raises(RewardError, match="id_reused: request id dup"):
            RewardClient(redis_url, REWARD, timeout_s=20, client_id="third").score(images[1:3], prompts[1:3])
    assert [(f["reason"], f["request_id"]) for f in dead_letters(r)] == [(b"id_reused", b"dup")] * 2
    assert r.xlen(LAYOUT.requests) == 0


def test_the_client_splits_a_batch_to_fit_the_pixel_limit(redis_url, reward_model, digits):
    r = redis.Redis.from_url(redis_url)
    images, prompts = digits[0][:6], digits[1][:6]
    with serving(redis_url, reward_model):
        client = RewardClient(redis_url, REWARD, timeout_s=20, limits=RequestLimits(max_pixels_per_request=2 * 64))
        assert_same_scores(client.score(images, prompts), reward_model, images, prompts)
    assert_all_consumed_once(r, 3)  # 2 images of 8×8 per request

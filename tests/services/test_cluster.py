"""Which Ray cluster `fmrl train` joins, who can reach it, and what a killed driver leaves.

Every case runs the real ``ensure_ray`` in a subprocess (the probe below), in a private
RAY_TMPDIR, so neither this process's Ray state nor the machine's /tmp/ray is touched. Each
probe and each head carries MARKER=<that temp dir> in its environment, inherited by every
process of its cluster: teardown finds and stops exactly those, and the fate-sharing tests
use it to see what is left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, terminate

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = Path(sys.executable).parent / "ray"
MARKER = "FMRL_TEST_CLUSTER"
# A role's process by its title, or by its command line before it has renamed itself.
ROLES = {"GCS": ("gcs_server",), "raylet": ("raylet/raylet",),
         "dashboard agent": ("ray::DashboardAgent", "dashboard/agent.py"),
         "runtime env agent": ("ray::RuntimeEnvAgent", "runtime_env/agent/main.py"), "actor": ("ray::Echo",)}
START_S = 120  # generous: a cluster starts in seconds, a stale address hangs ray.init for ~12 min

# ensure_ray as `fmrl train` calls it, then two actors; prints one JSON line describing the
# cluster and every process of it (the driver and its descendants), then exits (report) or
# waits to be killed (hold).
PROBE = r"""
import json, os, sys, time
import psutil, ray
from services.config import load_config
from services.driver import ensure_ray

started = ensure_ray(load_config(None, []))  # the defaults, as `fmrl train`

@ray.remote(num_cpus=0.5)
class Echo:
    def pid(self):
        return os.getpid()

actors = [Echo.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
me = psutil.Process()
procs = [me, *me.children(recursive=True)]
print(json.dumps({
    "started": started, "gcs": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
    "jobs": len(ray._private.state.jobs()),  # every driver that ever connected to this GCS
    "procs": [[p.pid, p.create_time(), " ".join(p.cmdline())[:120]] for p in procs]}), flush=True)
if sys.argv[1] == "hold":
    time.sleep(3600)
ray.shutdown()
"""


def _marked(temp: Path) -> list[psutil.Process]:
    """Live (not zombie) processes carrying MARKER=<temp> in their environment. Read from /proc
    entry by entry: a process that renamed itself (ray::DashboardAgent) has zeroed the start of
    its environment block, where psutil's environ() stops."""
    want = f"{MARKER}={temp}".encode()
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if want in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0") \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def _alive(procs: list[list]) -> list[str]:
    """Those of the (pid, create_time, cmdline) rows a probe reported that still run."""
    left = []
    for pid, created, cmd in procs:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {cmd}")
    return left


def _kill_marked(temp: Path) -> None:
    # clean-up only (no test asserts on it): an agent that ignores SIGTERM is not waited for long
    for sig, wait_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
        for p in _marked(temp):
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        psutil.wait_procs(_marked(temp), timeout=wait_s)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A private RAY_TMPDIR (short: Ray's Unix socket paths are limited to ~107 bytes);
    whatever of its clusters still runs at the end is stopped."""
    temp = Path(tempfile.mkdtemp(prefix="fmrl-ct-", dir="/tmp"))
    try:
        yield temp
    finally:
        _kill_marked(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _env(temp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "TMPDIR")}
    return {**env, "RAY_TMPDIR": str(temp), MARKER: str(temp), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _probe(temp: Path, mode: str, **env: str) -> tuple[subprocess.Popen, dict]:
    """Start the probe and wait (START_S at most) for its report."""
    err = (temp / f"probe-{time.monotonic_ns()}.err").open("w")
    proc = subprocess.Popen([sys.executable, "-c", PROBE, mode], cwd=REPO, env=_env(temp, **env),
                            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if sel.select(START_S) else ""
    if not line.startswith("{"):
        proc.kill()
        proc.wait()
        pytest.fail(f"no report from ensure_ray within {START_S} s (exit {proc.returncode}); stderr:\n"
                    f"{Path(err.name).read_text()[-3000:]}", pytrace=False)
    return proc, json.loads(line)


def _finish(proc: subprocess.Popen) -> None:
    try:
        proc.wait(START_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the probe did not exit after ray.shutdown()")
    assert proc.returncode == 0


def _start_head(temp: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` recording itself in temp/ray/ray_current_cluster, as any
    `ray start` on this machine does in /tmp/ray; returns it and its GCS address. Ray's default
    authentication: the token of ~/.ray/auth_token, which a bare ray.init() also picks up."""
    address_file = temp / "ray" / "ray_current_cluster"
    log = (temp / "head.log").open("w")
    cmd = [str(RAY_CLI), "start", "--head", "--block", "--temp-dir", str(temp / "ray"), "--port", str(free_port()),
           "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(temp), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + START_S
    while not address_file.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start --head` did not come up:\n{Path(log.name).read_text()[-3000:]}", pytrace=False)
        time.sleep(0.2)
    return proc, address_file.read_text().strip()


def test_a_stale_cluster_file_starts_an_embedded_cluster_promptly(ray_tmp: Path) -> None:
    # A real stale record: a head that died by SIGKILL with its whole process group.
    head, gcs = _start_head(ray_tmp)
    os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    _kill_marked(ray_tmp)
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text().strip() == gcs

    proc, report = _probe(ray_tmp, "report")
    _finish(proc)
    assert report["started"] is True
    assert report["gcs"] != gcs and report["nodes"] == 1 and report["jobs"] == 1


def test_a_live_head_on_this_machine_is_not_joined_without_ray_address(ray_tmp: Path) -> None:
    head, gcs = _start_head(ray_tmp)
    try:
        proc, embedded = _probe(ray_tmp, "report")
        _finish(proc)
        assert embedded["started"] is True
        assert embedded["gcs"] != gcs and embedded["nodes"] == 1 and embedded["jobs"] == 1

        # RAY_ADDRESS still joins that head; and the head has seen no driver but this one.
        proc, joined = _probe(ray_tmp, "report", RAY_ADDRESS=gcs, RAY_AUTH_MODE="token")  # as the README says
        _finish(proc)
        assert joined["started"] is False
        assert joined["gcs"] == gcs and joined["nodes"] == 1 and joined["jobs"] == 1
    finally:
        terminate(head, 30)


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def test_an_embedded_cluster_listens_on_loopback_only(ray_tmp: Path) -> None:
    proc, report = _probe(ray_tmp, "hold")
    try:
        listening = {}
        for pid, _, cmd in report["procs"]:
            with contextlib.suppress(psutil.Error):
                socks = psutil.Process(pid).net_connections(kind="inet")
                listening[f"{pid} {cmd}"] = [(c.laddr.ip, c.laddr.port) for c in socks
                                             if c.status == psutil.CONN_LISTEN]
        names = " ".join(listening)
        for role, seen_as in ROLES.items():
            assert any(s in names for s in seen_as), f"no {role} among the cluster's processes: {list(listening)}"
        assert sum(map(len, listening.values())) >= 6  # GCS, raylet, agents, workers, driver
        exposed = {p: [a for a in addrs if not _loopback(a[0])] for p, addrs in listening.items()}
        assert not {p: a for p, a in exposed.items() if a}, exposed
    finally:
        proc.kill()
        proc.wait()


def test_a_sigkilled_driver_takes_its_embedded_cluster_with_it(ray_tmp: Path) -> None:
    proc, report = _probe(ray_tmp, "hold")
    assert any(s in cmd for _, _, cmd in report["procs"] for s in ROLES["dashboard agent"])
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while (left := _alive(report["procs"]) + [f"{p.pid} {p.cmdline()}" for p in _marked(ray_tmp)]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"still running 60 s after the driver was killed: {left}"


def test_the_orphans_of_a_killed_driver_and_guard_are_reaped_at_the_next_start(ray_tmp: Path) -> None:
    proc, report = _probe(ray_tmp, "hold")
    guards = [pid for pid, _, cmd in report["procs"] if "cluster_guard" in cmd]
    assert guards, "no guard process among the driver's children"
    for pid in guards:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()

    nxt, _ = _probe(ray_tmp, "report")  # the next embedded start on this machine
    _finish(nxt)
    deadline = time.monotonic() + 60
    while (left := _alive(report["procs"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left by the killed driver and still running after the next start: {left}"


@pytest.mark.slow
def test_a_run_on_the_embedded_cluster_syncs_weights_by_torch_distributed(ray_tmp: Path, small_policy: Path) -> None:
    """`fmrl train` as a user runs it, no RAY_ADDRESS: the loopback node IP is the address the
    learner hosts the gloo group on, and every sampler applies every published version."""
    out = ray_tmp / "runs"
    sets = [f"policy.checkpoint={small_policy}", f"run.out_dir={out}", "run.name=t", "run.iterations=2",
            "run.progress=false", "rollout.samples_per_prompt=3", "rollout.prompts_per_iteration=4",
            "eval.samples_per_prompt=2", "eval.grid_columns=2", "learner.lr=1e-3", "metrics.port=0",
            "resources.sampler_cpus=0.25", "resources.learner_cpus=0.25", "resources.reward_cpus=0.25",
            "resources.ray_num_cpus=2", "pipeline.weight_sync=torch_distributed"]
    cmd = [sys.executable, "-m", "services.cli", "train", *[a for s in sets for a in ("--set", s)]]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=_env(ray_tmp), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`fmrl train` did not finish within 600 s:\n{(e.stderr or b'')[-3000:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "t" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["kind"] == "train"]
    assert [x["iteration"] for x in train] == [0, 1]
    assert all(x["sampler_versions"] == [x["version"]] * len(x["sampler_versions"]) for x in train), train
    assert train[-1]["version"] > 0

"""Which Ray cluster `fmrl train` joins, who can reach it, and what a killed driver leaves.

Every case runs the real ``ensure_ray`` in a subprocess (the probe below), in a private
RAY_TMPDIR, so neither this process's Ray state nor the machine's /tmp/ray is touched. Each
probe and each head carries MARKER=<that temp dir> in its environment, inherited by every
process of its cluster: teardown finds and stops exactly those, and the fate-sharing tests
use it to see what is left.

A cluster takes seconds to start on a small machine, so the tests that only look at one share
it (module fixtures): the held embedded cluster the loopback test inspects is the one the
SIGKILL test then kills, and the live head the RAY_ADDRESS test joins is the one the stale-file
test then kills. A test that ends a shared cluster takes it; whichever test comes next (any
order, any selection) gets a fresh one.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_ports

# starts Ray processes of its own: the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes

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
# waits to be killed (hold). Imported from services.cluster, not through services.driver (the
# same function, test_the_probe_runs_the_ensure_ray_of_fmrl_train): the driver's torch import
# would add seconds to every probe and nothing to the cluster.
PROBE = r"""
import json, os, sys, time
import psutil, ray
from services.config import load_config
from services.cluster import ensure_ray

started = ensure_ray(load_config(None, []))  # the defaults, as `fmrl train`

@ray.remote(num_cpus=0.5)
class Echo:
    def pid(self):
        return os.getpid()

actors = [Echo.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
me = psutil.Process()
rows = []
for p in [me, *me.children(recursive=True)]:
    try:
        rows.append([p.pid, p.create_time(), " ".join(p.cmdline())[:120]])
    except psutil.Error:  # exited since it was listed: nothing of it is left to look at
        pass
print(json.dumps({
    "started": started, "gcs": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
    "jobs": len(ray._private.state.jobs()),  # every driver that ever connected to this GCS
    "procs": rows}), flush=True)
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


def _described(procs: list[psutil.Process]) -> list[str]:
    """"<pid> <command line>" of each of ``procs`` still there (one may end while it is read)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.cmdline()}")
    return out


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


def _wait_gone(find: Callable[[], list[str]], timeout_s: float) -> list[str]:
    """Poll ``find`` until it finds nothing or ``timeout_s`` passed; returns what it last found.
    (Not psutil.wait_procs: a zombie nobody reaps counts as running there, as it does not here.)"""
    deadline = time.monotonic() + timeout_s
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.1)  # each look reads every process's environment
    return left


def _new_tmp() -> Path:
    """A private RAY_TMPDIR (short: Ray's Unix socket paths are limited to ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="fmrl-ct-", dir="/tmp"))


def _clean_tmp(temp: Path) -> None:
    _kill_marked(temp)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A private RAY_TMPDIR; whatever of its clusters still runs at the end is stopped."""
    temp = _new_tmp()
    try:
        yield temp
    finally:
        _clean_tmp(temp)


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
    # its dashboard agent off Ray's default port (52365), which the probes' embedded clusters
    # take: an agent finding its port taken retries for ~3 s before the node comes up
    gcs_port, agent_port = free_ports(2)
    cmd = [str(RAY_CLI), "start", "--head", "--block", "--temp-dir", str(temp / "ray"), "--port", str(gcs_port),
           "--dashboard-agent-listen-port", str(agent_port), "--num-cpus", "1", "--include-dashboard", "false",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(temp), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + START_S
    # Ray creates the file before it writes the address into it: wait for the address itself
    # (read at creation, it was once empty, and both tests of this head then failed)
    while not (address_file.is_file() and address_file.read_text().strip().endswith(f":{gcs_port}")):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start --head` did not come up:\n{Path(log.name).read_text()[-3000:]}", pytrace=False)
        time.sleep(0.02)
    return proc, address_file.read_text().strip()


@dataclass
class _Head:
    temp: Path  # its RAY_TMPDIR, which records it in ray/ray_current_cluster
    proc: subprocess.Popen
    gcs: str
    joined: bool = False  # a driver has connected to it
    taken: bool = False  # by a test that ends it


@dataclass
class _Held:
    temp: Path  # its RAY_TMPDIR, of this cluster alone
    proc: subprocess.Popen  # the probe holding it (hold mode)
    report: dict


@pytest.fixture(scope="module")
def heads() -> Iterator[Callable[..., _Head]]:
    """``heads()``: a live `ray start --head` in its own RAY_TMPDIR that no driver has joined;
    ``heads(take=True)``: that head (or a new one) for a test that ends it. One head serves the
    RAY_ADDRESS test and then the stale-file test. Stopped at the end of the module."""
    made: list[_Head] = []

    def get(take: bool = False) -> _Head:
        usable = [h for h in made if not h.taken and h.proc.poll() is None and (take or not h.joined)]
        if usable:
            head = usable[-1]
        else:
            temp = _new_tmp()
            made.append(head := _Head(temp, *_start_head_in(temp)))
        head.taken = take
        return head

    yield get
    for head in made:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.proc.pid, signal.SIGKILL)
        head.proc.wait()
        _clean_tmp(head.temp)


def _start_head_in(temp: Path) -> tuple[subprocess.Popen, str]:
    try:
        return _start_head(temp)
    except BaseException:
        _clean_tmp(temp)
        raise


@pytest.fixture(scope="module")
def held_cluster() -> Iterator[Callable[..., _Held]]:
    """``held_cluster()``: an embedded cluster a probe holds (hold mode), in its own RAY_TMPDIR,
    the same one for every test that only looks at it; ``held_cluster(take=True)``: that one
    for a test that ends it, after which the next caller gets a new one. Stopped at the end of
    the module."""
    made: list[_Held] = []
    current: list[_Held] = []

    def get(take: bool = False) -> _Held:
        if not current:
            temp = _new_tmp()
            try:
                proc, report = _probe(temp, "hold")
            except BaseException:
                _clean_tmp(temp)
                raise
            made.append(held := _Held(temp, proc, report))
            current.append(held)
        held = current[0]
        if take:
            current.clear()
        return held

    yield get
    for held in made:
        if held.proc.poll() is None:
            held.proc.kill()
        held.proc.wait()
        _clean_tmp(held.temp)


def test_the_probe_runs_the_ensure_ray_of_fmrl_train() -> None:
    from services import cluster, driver

    assert driver.ensure_ray is cluster.ensure_ray


def test_a_live_head_on_this_machine_is_not_joined_without_ray_address(heads: Callable[..., _Head]) -> None:
    head = heads()
    head.joined = True  # by the second probe below
    gcs = head.gcs
    proc, embedded = _probe(head.temp, "report")
    _finish(proc)
    assert embedded["started"] is True
    assert embedded["gcs"] != gcs and embedded["nodes"] == 1 and embedded["jobs"] == 1

    # RAY_ADDRESS still joins that head; and the head has seen no driver but this one.
    proc, joined = _probe(head.temp, "report", RAY_ADDRESS=gcs, RAY_AUTH_MODE="token")  # as the README says
    _finish(proc)
    assert joined["started"] is False
    assert joined["gcs"] == gcs and joined["nodes"] == 1 and joined["jobs"] == 1


def test_a_stale_cluster_file_starts_an_embedded_cluster_promptly(heads: Callable[..., _Head]) -> None:
    # A real stale record: a head that died by SIGKILL with its whole process group.
    head = heads(take=True)
    temp, gcs = head.temp, head.gcs
    os.killpg(head.proc.pid, signal.SIGKILL)
    head.proc.wait()
    _kill_marked(temp)
    assert (temp / "ray" / "ray_current_cluster").read_text().strip() == gcs

    proc, report = _probe(temp, "report")
    _finish(proc)
    assert report["started"] is True
    assert report["gcs"] != gcs and report["nodes"] == 1 and report["jobs"] == 1


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def test_an_embedded_cluster_listens_on_loopback_only(held_cluster: Callable[..., _Held]) -> None:
    report = held_cluster().report  # looked at, not changed: the SIGKILL test below ends it
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


def test_a_sigkilled_driver_takes_its_embedded_cluster_with_it(held_cluster: Callable[..., _Held]) -> None:
    held = held_cluster(take=True)
    proc, report = held.proc, held.report
    assert proc.poll() is None, "the probe holding the cluster is gone already"
    assert any(s in cmd for _, _, cmd in report["procs"] for s in ROLES["dashboard agent"])
    proc.kill()
    proc.wait()
    left = _wait_gone(lambda: _alive(report["procs"]) + _described(_marked(held.temp)), 60)
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
    left = _wait_gone(lambda: _alive(report["procs"]), 60)
    assert not left, f"left by the killed driver and still running after the next start: {left}"


@pytest.mark.slow
def test_a_run_on_the_embedded_cluster_syncs_weights_by_torch_distributed(ray_tmp: Path, small_policy: Path) -> None:
    """`fmrl train` as a user runs it, no RAY_ADDRESS: the loopback node IP is the address the
    learner hosts the gloo group on, and the sampler applies every published version (one
    sampler: several are tests/services/test_runtime.py's torch_distributed run)."""
    out = ray_tmp / "runs"
    sets = [f"policy.checkpoint={small_policy}", f"run.out_dir={out}", "run.name=t", "run.iterations=2",
            "run.progress=false", "rollout.samples_per_prompt=3", "rollout.prompts_per_iteration=4",
            "eval.samples_per_prompt=2", "eval.grid_columns=2", "learner.lr=1e-3", "metrics.port=0",
            "resources.sampler_cpus=0.25", "resources.learner_cpus=0.25", "resources.reward_cpus=0.25",
            "resources.ray_num_cpus=2", "resources.num_samplers=1", "pipeline.weight_sync=torch_distributed"]
    cmd = [sys.executable, "-m", "services.cli", "train", *[a for s in sets for a in ("--set", s)]]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=_env(ray_tmp), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`fmrl train` did not finish within 600 s:\n{(e.stderr or b'')[-3000:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "t" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["kind"] == "train"]
    assert [x["iteration"] for x in train] == [0, 1]
    assert all(x["sampler_versions"] == [x["version"]] for x in train), train
    assert train[-1]["version"] > 0

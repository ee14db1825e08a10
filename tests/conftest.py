import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The tests' Ray cluster (``cluster``), joined by this process. Starting one costs seconds of
# both cores (GCS, raylet, dashboard and runtime-env agents, log monitor, idle workers), so the
# modules that ask for it share one: pytest_collection_modifyitems runs them one after another,
# the first starts it, and any other module stops it first (its subprocesses start clusters of
# their own, whose agents would otherwise wait seconds for the port this one holds).
#
# `make test` runs the suite on two pytest-xdist workers. Every module that starts Ray processes
# (asks for ``cluster``, or starts a cluster, a head or `fmrl train` of its own) says so with
# ``pytestmark = pytest.mark.ray_processes``: those modules are one unit of work (RAY_GROUP),
# run in this order on one worker, never beside another Ray cluster of the suite; every other
# module is a unit of its own (its module fixtures set up once) on whichever worker is free.
# The Ray modules are most of the suite and wait on process starts for about a quarter of their
# time, which the other worker's modules fill.
RAY_TEST_CLUSTER = {"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
RAY_MARK = "ray_processes"
RAY_GROUP = "ray-processes"


RAY_MARK_LINE = f"pytestmark = pytest.mark.{RAY_MARK}"  # how a module carries it: the controller reads it
_CLUSTER_USERS = pytest.StashKey[set]()  # the modules that ask for ``cluster``, found at collection


def _module_of(item: pytest.Item) -> object:
    return getattr(item, "module", None)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Ray modules first, those that ask for ``cluster`` one after another, each in its own
    order; then the rest in theirs. A module that asks for ``cluster`` unmarked, or is marked
    otherwise than by RAY_MARK_LINE (which the scheduler reads), is refused."""
    users = {_module_of(i) for i in items if "cluster" in getattr(i, "fixturenames", ())}
    marked = {_module_of(i) for i in items if i.get_closest_marker(RAY_MARK)}
    if unmarked := sorted(getattr(m, "__name__", "?") for m in users - marked):
        raise pytest.UsageError(f"{', '.join(unmarked)} ask for `cluster` without `{RAY_MARK_LINE}` (tests/conftest.py)")
    if unread := sorted(getattr(m, "__name__", "?") for m in marked
                        if RAY_MARK_LINE not in Path(getattr(m, "__file__", "")).read_text(encoding="utf-8")):
        raise pytest.UsageError(f"{', '.join(unread)} carry {RAY_MARK} without the line `{RAY_MARK_LINE}`, "
                                "which the xdist scheduler reads (tests/conftest.py)")
    config.stash[_CLUSTER_USERS] = users
    items[:] = ([i for i in items if _module_of(i) in users]
                + [i for i in items if _module_of(i) in marked - users]
                + [i for i in items if _module_of(i) not in marked])


def _marked_files(rootdir: Path) -> set[str]:
    """The test files (relative to ``rootdir``, as node ids begin) that carry RAY_MARK_LINE: read
    from their text, as pytest-xdist's controller collects nothing."""
    return {p.relative_to(rootdir).as_posix() for p in (rootdir / "tests").rglob("test_*.py")
            if RAY_MARK_LINE in p.read_text(encoding="utf-8")}


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the suite also runs without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's load-by-scope scheduler, a scope per module and one for all Ray modules."""
    from xdist.scheduler import LoadScopeScheduling

    ray_files = _marked_files(Path(config.rootpath))

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return RAY_GROUP if path in ray_files else path

    return RayGroupScheduling(config, log)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The shared Ray cluster (RAY_TEST_CLUSTER): started if no cluster is joined, never stopped
    here (the next module that asks joins it; see ``_ray_only_where_asked``)."""
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_TEST_CLUSTER)
    yield


@pytest.fixture(scope="module", autouse=True)
def _ray_only_where_asked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop the shared cluster before a module none of whose tests asks for it."""
    if "ray" in sys.modules and request.module not in request.config.stash.get(_CLUSTER_USERS, set()):
        import ray

        if ray.is_initialized():
            ray.shutdown()
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_stopped_at_the_end() -> Iterator[None]:
    yield
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def scrape_metrics(port: int) -> dict:
    """``http://127.0.0.1:<port>/metrics`` parsed by prometheus-client: {family name: family}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it if it is still there after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int, avoid: range = range(0)) -> list[int]:
    """``n`` different free ports, none in ``avoid`` (``free_port`` called n times may hand out
    one port twice: the kernel reuses a port once its socket closes; these stay bound until all
    are chosen)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            if (p := s.getsockname()[1]) not in avoid:
                ports.append(p)
        return ports
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalServer:
    """A server process a test started on 127.0.0.1; ``stop`` sends SIGTERM, then SIGKILL."""

    port: int
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisServer(LocalServer):
    """A redis-server this test session started; ``url`` reaches it (plain TCP)."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(workdir: Path, *args: str, port: int | None = None,
                ready_port: int | None = None) -> RedisServer:
    """Start ``redis-server`` on a free port (``args`` are extra config options) and wait
    until it accepts TCP connections on ``ready_port`` (default: its port)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; the reward-service tests need it: run `make programs` "
                    "(or `apt-get install -y redis-server`)", pytrace=False)
    port = free_port() if port is None else port
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"redis-{port}.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(log), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = RedisServer(port, proc, log)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            pytest.fail(f"redis-server exited with {proc.returncode}:\n{text[-2000:]}", pytrace=False)
        try:
            socket.create_connection(("127.0.0.1", ready_port or port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail("redis-server did not come up within 10 s", pytrace=False)
            time.sleep(0.01)
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One plain redis-server for the session; tests flush it (see ``redis_url``)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied for this test."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator:
    """Start extra redis-servers with their own options (ACL users, TLS); stopped after the test."""
    started: list[RedisServer] = []

    def start(*args: str, **kw: object) -> RedisServer:
        server = start_redis(tmp_path / "redis", *args, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module of tiny models: on a busy 2-core host a second thread
    only oversubscribes the cores (up to 10× slower). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PrometheusServer(LocalServer):
    """A real ``prometheus`` this test started (127.0.0.1, a free port, storage in a tmp dir)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: object) -> dict:
        """``/api/v1/<path>``'s data (GET with ``params``); a refused query raises."""
        from telemetry.snapshot import prometheus_api

        return prometheus_api(self.url, path, **params)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        from telemetry.snapshot import query_range

        return query_range(self.url, expr, start, end, step)

    def wait_scraped(self, timeout: float = 20.0) -> None:
        """Until a target has been scraped: ready is not enough, Prometheus applies the config's
        targets on a 5 s tick, so the first scrape can come seconds later."""
        deadline = time.monotonic() + timeout
        while not self.api("query", query="up == 1")["result"]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus scraped nothing within {timeout} s:\n{self.log.read_text()[-2000:]}",
                            pytrace=False)
            time.sleep(0.1)



def start_prometheus(workdir: Path, targets: dict[str, list[str]] | None = None, interval: str = "1s",
                     config_file: Path | None = None) -> PrometheusServer:
    """Start ``prometheus`` scraping ``targets`` (job → host:port list) every ``interval``, or
    as ``config_file`` says; returns once it reports ready."""
    import json
    import urllib.request

    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed; `make test` installs it (apt-get install -y prometheus)",
                    pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    if config_file is None:
        config_file = workdir / "prometheus.yml"
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                                     for job, hosts in (targets or {}).items()]}
        config_file.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, f"--config.file={config_file}",
                                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)
    server = PrometheusServer(port, proc, log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-2000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"prometheus was not ready within 30 s:\n{log.read_text()[-2000:]}", pytrace=False)
        time.sleep(0.05)

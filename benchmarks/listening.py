"""Which interfaces an embedded Ray cluster listens on, process by process.

Starts the embedded cluster of `fmrl train` (``ensure_ray`` with the default config) in a
private RAY_TMPDIR, starts two actors, then lists every listening TCP socket of the driver and
its descendants (GCS, raylet, dashboard head, monitor, agents, workers) and, for each, what a
client gets when it connects to that port through this machine's first non-loopback address
(``refused``, ``http <status>`` for an HTTP GET of /metrics, or ``open`` for a non-HTTP
listener). Prints a markdown table. Not run in CI.

    .venv/bin/python benchmarks/listening.py        # ~20 s on 2 cores
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def outside_address() -> str | None:
    """This machine's first non-loopback IPv4 address: how another host would reach it."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def probe(host: str, port: int) -> str:
    """What a client connecting to ``host:port`` gets."""
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError:
        return "refused"
    try:
        with NO_PROXY.open(f"http://{host}:{port}/metrics", timeout=3) as r:
            return f"http {r.status}"
    except urllib.error.HTTPError as e:
        return f"http {e.code}"
    except (OSError, ValueError, http.client.HTTPException):  # a gRPC or other non-HTTP listener
        return "open"


def name_of(p) -> str:  # noqa: ANN001 - psutil.Process
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    if p.pid == os.getpid():
        return "driver (ensure_ray)"
    script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), None)
    return script or Path(cmd[0]).name


def main() -> None:
    temp = tempfile.mkdtemp(prefix="fmrl-ls-", dir="/tmp")  # short: Ray's socket paths are limited
    os.environ["RAY_TMPDIR"] = temp
    os.environ.pop("RAY_ADDRESS", None)
    import psutil
    import ray

    from services.config import load_config
    from services.driver import ensure_ray

    try:
        ensure_ray(load_config(None, ["resources.ray_num_cpus=2"]))

        @ray.remote(num_cpus=0.5)
        class Echo:
            def pid(self) -> int:
                return os.getpid()

        actors = [Echo.remote() for _ in range(2)]
        ray.get([a.pid.remote() for a in actors])
        outside = outside_address()
        me = psutil.Process()
        rows = []
        for p in [me, *me.children(recursive=True)]:
            try:
                socks = [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
                name = name_of(p)
            except psutil.Error:
                continue
            for c in sorted(socks, key=lambda c: (c.laddr.ip, c.laddr.port)):
                seen = probe(outside, c.laddr.port) if outside else "n/a"
                rows.append(f"| {name} | {c.laddr.ip}:{c.laddr.port} | {seen} |")
        print(f"ray {ray.__version__}; reached from {outside}\n")
        print(f"| process | listens on | from {outside} |\n|---|---|---|")
        print("\n".join(rows))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

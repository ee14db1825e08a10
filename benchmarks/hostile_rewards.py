"""Peak memory of a Redis reward worker under hostile requests (issue 17, item 2).

Each hostile request is a few kB on the wire: N zero-filled side×side PNGs (they compress to
almost nothing) whose metadata honestly declares shape (N, side, side, C). A worker that
allocates N·side²·C bytes from the declared shape before checking it decodes 12 GiB for the
issue's case (N = 256, 4096², RGB) and is OOM-killed, and so is each replacement that reclaims
the entry. This starts a redis-server and one worker process (`python -m reward_workers.service
--reward digits_classifier`), records the worker's resident memory when idle (VmRSS) and its
peak (VmHWM, from /proc/<pid>/status) after it handled the requests, and what became of them.

--worker-path runs the worker from another copy of the package (e.g. the code before a fix,
exported with ``git archive <rev> reward_workers | tar -x -C /tmp/old``). Linux only. Not run in CI.

    .venv/bin/python benchmarks/hostile_rewards.py --images 42            # declares 2 GiB
    .venv/bin/python benchmarks/hostile_rewards.py --images 42 --worker-path /tmp/old
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARD = "digits_classifier"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def hostile_fields(rid: str, n: int, side: int, channels: int, reply_to: str) -> dict[bytes, bytes]:
    """A request declaring (n, side, side, channels) honestly, as n zero PNGs."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new({1: "L", 3: "RGB", 4: "RGBA"}[channels], (side, side)).save(buf, format="PNG", compress_level=9)
    png = buf.getvalue()
    meta = {"schema_version": 1, "request_id": rid, "reward": REWARD, "prompts": ["a handwritten one"] * n,
            "images": {"encoding": "png", "shape": [n, side, side, channels], "dtype": "uint8",
                       "lengths": [len(png)] * n},
            "reply_to": reply_to, "created_at": time.time(), "attempt": 1}
    return {b"meta": json.dumps(meta).encode(), b"images": png * n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=42, help="images per request (N); 42 RGB 4096² declare 2 GiB")
    p.add_argument("--side", type=int, default=4096, help="image height and width")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3, 4))
    p.add_argument("--requests", type=int, default=1, help="hostile requests sent")
    p.add_argument("--max-deliveries", type=int, default=1, help="the worker's --max-deliveries")
    p.add_argument("--worker-path", type=Path, default=None,
                   help="directory holding the reward_workers package the worker runs (default: this tree)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up waiting after this long")
    args = p.parse_args()
    exe = shutil.which("redis-server")
    if exe is None:
        print("hostile_rewards: error: redis-server is not installed", file=sys.stderr)
        return 2
    import redis

    declared = args.images * args.side ** 2 * args.channels
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        worker = None
        try:
            url = f"redis://127.0.0.1:{port}/0"
            r = redis.Redis.from_url(url)
            for _ in range(500):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            pythonpath = [str(args.worker_path)] if args.worker_path else []
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath + [str(ROOT)]), PYTHONUNBUFFERED="1")
            log_path = Path(tmp) / "worker.log"
            with log_path.open("wb") as log:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "reward_workers.service", "--reward", REWARD, "--redis-url", url,
                     "--consumer", "hostile", "--block-ms", "200", "--max-deliveries", str(args.max_deliveries)],
                    cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
            stream, group = f"fmrl:reward:{REWARD}:requests", f"fmrl-reward-{REWARD}"
            deadline = time.monotonic() + 120
            while not any(c["name"] == "fmrl-reward-hostile" and c["cmd"] == "xreadgroup" for c in r.client_list()):
                if worker.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.05)
            idle_kib = proc_kib(worker.pid, "VmRSS")
            module = subprocess.run([sys.executable, "-c", "import reward_workers.service as s; print(s.__file__)"],
                                    env=env, cwd=tmp, capture_output=True, text=True).stdout.strip()
            wire = 0
            for i in range(args.requests):
                fields = hostile_fields(f"hostile-{i}", args.images, args.side, args.channels,
                                        f"fmrl:reward:{REWARD}:reply:bench")
                wire = sum(len(v) for v in fields.values())
                r.xadd(stream, fields)
            t0 = time.monotonic()
            peak_kib = idle_kib
            while time.monotonic() - t0 < args.timeout_s and worker.poll() is None:
                peak_kib = max(peak_kib, proc_kib(worker.pid, "VmHWM"))
                if r.xlen(stream) == 0 and r.xpending(stream, group)["pending"] == 0:
                    break
                time.sleep(0.05)
            alive = worker.poll() is None
            if alive:
                peak_kib = max(peak_kib, proc_kib(worker.pid, "VmHWM"))
            letters = [(f[b"reason"].decode(), f[b"error"].decode()[:160]) for _, f in r.xrange(f"fmrl:reward:{REWARD}:dead")]
            report = {
                "worker_module": module,
                "declared_shape": [args.images, args.side, args.side, args.channels],
                "declared_decoded_bytes": declared, "request_bytes_on_wire": wire, "requests": args.requests,
                "worker_idle_rss_mib": round(idle_kib / 1024, 1), "worker_peak_rss_mib": round(peak_kib / 1024, 1),
                "worker_alive_after": alive, "worker_exit_code": worker.returncode,
                "handled_s": round(time.monotonic() - t0, 2),
                "left_in_stream": r.xlen(stream), "dead_letters": letters,
                "dead_stream_bytes": r.memory_usage(f"fmrl:reward:{REWARD}:dead"),
            }
            print(json.dumps(report, indent=2))
        finally:
            if worker is not None and worker.poll() is None:
                worker.terminate()
                worker.wait(15)
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reward transport: requests/s and latency through Redis services and in-cluster Ray actors.

Scores batches of 8 images (16×16 and 512×512, RGB) with a real reward (JPEG
compressibility: CPU-bound at both sizes) three ways:
- in-process: calling the reward directly (the floor);
- in-cluster: a Ray actor holding the reward, images passed by ``ray.get(actor.score.remote(...))``;
- Redis: `fmrl reward-worker` processes and the training client (``RewardClient``), PNG and raw.

Latency is measured one request at a time (p50, p99); throughput with 8 requests in flight
(for Redis: 8 requests in one ``score`` call of 64 images; for Ray: 8 pipelined calls).
The transport overhead is the median latency minus the in-process median. Writes its table
into docs/performance.md between markers. Not run in CI.

    .venv/bin/python benchmarks/reward_transport.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from common import ROOT, machine, write_section

BEGIN, END = "<!-- reward-transport:begin -->", "<!-- reward-transport:end -->"
KIND = "jpeg_compressibility"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(side: int, n: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Smooth random images (JPEG-like content, not white noise) and their prompts."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (n, max(2, side // 8), max(2, side // 8), 3)).astype(np.float32)
    img = np.repeat(np.repeat(small, 8, 1), 8, 2)[:, :side, :side]
    img = np.clip(img + g.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return img, [f"prompt {i}" for i in range(n)]


def stats(lat: list[float]) -> tuple[float, float]:
    return float(np.percentile(lat, 50)) * 1e3, float(np.percentile(lat, 99)) * 1e3


def time_calls(reps: int, fn, *args) -> list[float]:  # noqa: ANN001 - any callable and its arguments
    fn(*args)  # warm
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def start_redis() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (make programs)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_workers(url: str, n: int) -> list[subprocess.Popen]:
    import redis

    procs = [subprocess.Popen([str(ROOT / ".venv/bin/fmrl"), "reward-worker", "--reward", KIND, "--redis-url", url,
                               "--consumer", f"bench{i}", "--block-ms", "500"],
                              cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
    r = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = {c["name"] for c in r.client_list() if c["cmd"] == "xreadgroup"}
        if all(f"fmrl-reward-bench{i}" in names for i in range(n)):
            return procs
        time.sleep(0.1)
    sys.exit("reward workers did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=60, help="sequential requests per path and size (latency)")
    p.add_argument("--rounds", type=int, default=30, help="rounds of 8 requests in flight (throughput)")
    p.add_argument("--workers", type=int, default=2, help="reward-worker processes for the Redis path")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()

    import ray

    from reward_workers.client import RewardClient
    from reward_workers.registry import build_reward

    reward = build_reward(KIND)
    sizes = (16, 512)
    rows: list[tuple[str, int, float, float, float, float]] = []  # path, side, p50, p99, req/s, overhead
    floor: dict[int, float] = {}
    for side in sizes:
        images, prompts = batch(side)
        lat = time_calls(args.reps, reward, images, prompts)
        floor[side] = stats(lat)[0]
        rows.append(("in-process call", side, *stats(lat), 1.0 / float(np.mean(lat)), 0.0))

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0.5, max_concurrency=1)
    class RewardActor:
        def __init__(self) -> None:
            import torch

            torch.set_num_threads(1)
            self.reward = build_reward(KIND)

        def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
            return self.reward(images, prompts).scores

    actors = [RewardActor.remote() for _ in range(args.workers)]
    warm_images, warm_prompts = batch(16)
    ray.get([a.score.remote(warm_images, warm_prompts) for a in actors])
    for side in sizes:
        images, prompts = batch(side)
        lat = time_calls(args.reps, lambda im, pr: ray.get(actors[0].score.remote(im, pr)), images, prompts)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            ray.get([actors[k % len(actors)].score.remote(images, prompts) for k in range(8)])
        rps = 8 * args.rounds / (time.perf_counter() - t0)
        p50, p99 = stats(lat)
        rows.append((f"in-cluster Ray actor ×{args.workers}", side, p50, p99, rps, p50 - floor[side]))
    ray.shutdown()

    server, url = start_redis()
    workers = start_workers(url, args.workers)
    try:
        for encoding in ("png", "raw"):
            client = RewardClient(url, KIND, max_images_per_request=8, max_in_flight=8, timeout_s=120,
                                  encoding=encoding)
            for side in sizes:
                images, prompts = batch(side)
                lat = time_calls(args.reps, client.score, images, prompts)
                many = np.concatenate([images] * 8)
                client.score(many, prompts * 8)  # every worker has scored before the clock starts
                t0 = time.perf_counter()
                for _ in range(args.rounds):
                    client.score(many, prompts * 8)
                rps = 8 * args.rounds / (time.perf_counter() - t0)
                p50, p99 = stats(lat)
                rows.append((f"Redis service ×{args.workers}, {encoding}", side, p50, p99, rps, p50 - floor[side]))
            client.close()
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
        server.terminate()

    lines = ["| path | image side | p50 latency (ms) | p99 latency (ms) | requests/s (8 in flight) "
             "| overhead vs in-process, p50 (ms) |", "|---|---|---|---|---|---|"]
    for path, side, p50, p99, rps, over in sorted(rows, key=lambda r: (r[1], r[0] != "in-process call")):
        rate = f"{rps:.1f}" if path != "in-process call" else f"{rps:.1f} (sequential)"
        lines.append(f"| {path} | {side}×{side} | {p50:.2f} | {p99:.2f} | {rate} | "
                     + ("—" if path == "in-process call" else f"{over:+.2f}") + " |")
    text = (f"Measured by `.venv/bin/python benchmarks/reward_transport.py` on {machine()}, "
            f"{time.strftime('%Y-%m-%d')}: one request = 8 RGB images, reward `{KIND}`, "
            f"{args.reps} sequential requests per row for latency.\n\n" + "\n".join(lines))
    print(text)
    if not args.no_write:
        write_section(BEGIN, END, "## Reward transport (issue 4)", text)


if __name__ == "__main__":
    main()

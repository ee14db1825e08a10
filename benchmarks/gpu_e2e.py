"""End-to-end training iterations of an SD3 pipeline in one process, without Ray: time per phase, peak memory.

The project's own parts, built by its own builders from a validated ``TrainConfig``
(services/world.py ``build_sampler`` / ``build_learner``, services/rewards.py ``RewardStage``),
driven by a short explicit loop instead of the Ray driver (Ray is not on the GPU image):

    rollout  Sampler.rollout: prompts → trajectories + decoded images
    reward   RewardStage.score: images → rewards (jpeg_compressibility: a built-in reward that
             needs no downloaded weights)
    update   Learner.update(batch, rewards): the objective's optimiser step(s)
    publish  Learner.publish() → Sampler.apply(version, state, checksum): the adapter's weights
             to the sampler (in memory; Ray's object store is not part of this timing)

GPU (default): the config is configs/sd3_medium.yaml (LoRA r32, 512 px, 10 steps, CFG 4.5, bf16,
ac_flow with its warm-up off so the actor trains from the first step) on the pipeline that
``fmrl make-random-sd3 --size medium`` writes: SD3.5-medium's transformer with random weights.
``--cpu``: configs/sd3_tiny_cpu.yaml on ``make-random-sd3 --size tiny``, one tiny batch, to
validate the script on a machine without a GPU.

    python benchmarks/gpu_e2e.py --pipeline /tmp/sd35m --results OUT/e2e.json       # on a CUDA GPU
    python benchmarks/gpu_e2e.py --cpu --pipeline /tmp/tiny --results /tmp/e2e.json  # CPU check

The sampler and the learner each load the pipeline, as their processes do in a run, so one
GPU holds both; ``learner_rank_peak_bytes`` = the update's peak − what the sampler holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, also where fmrl is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse in a storm",
           "a close-up photo of a hummingbird drinking nectar", "a bowl of ramen on a wooden table, studio lighting",
           "a red vintage car parked on a cobblestone street", "a fox sleeping in the snow under pine trees"]


def train_config(pipeline: Path, cpu: bool, prompts: int, samples_per_prompt: int, micro_batch: int) -> Any:  # noqa: ANN401
    """The shipped config (sd3_medium, or sd3_tiny_cpu with --cpu) with this check's changes,
    validated as a config file is (no overrides syntax: that needs omegaconf, not on the GPU image)."""
    import yaml

    from services.config import TrainConfig, resolve_config

    tree = yaml.safe_load(resolve_config("sd3_tiny_cpu" if cpu else "sd3_medium").read_text())
    tree["policy"].update(pretrained=str(pipeline), device="cpu" if cpu else "cuda")
    tree["rollout"] = {"prompts": PROMPTS[:prompts], "samples_per_prompt": samples_per_prompt}
    tree["algorithm"] = {"name": "ac_flow", "ac_flow": {"warmup_steps": 0}}  # the actor trains from step 1
    tree["learner"] = {**tree.get("learner", {}), "micro_batch_size": micro_batch}
    tree["reward"] = {"components": [{"kind": "jpeg_compressibility"}]}
    tree["resources"] = {"num_samplers": 1}
    tree.pop("pipeline", None)  # weight_sync / lag: the Ray driver's, not used here
    tree["run"] = {**tree.get("run", {}), "out_dir": "/tmp/fmrl-e2e-runs"}
    return TrainConfig.model_validate(tree)


class Memory:
    """CUDA allocator figures (None on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def now(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None


def timed(mem: Memory, row: dict[str, Any], name: str, fn: Any) -> Any:  # noqa: ANN401
    """``fn()``, its seconds and its peak memory in ``row`` as ``<name>_s`` and ``<name>_peak_bytes``."""
    mem.reset()
    t0 = time.perf_counter()
    result = fn()
    mem.sync()
    row[f"{name}_s"], row[f"{name}_peak_bytes"] = time.perf_counter() - t0, mem.peak()
    return result


def publish(learner: Any, sampler: Any) -> Any:  # noqa: ANN401
    """The learner's π_old weights to the sampler, checksum checked, as the driver passes them."""
    payload = learner.publish()
    sampler.apply(payload.version, payload.state, payload.checksum)
    return payload


def gib(x: float | None) -> str:
    return "N/A" if x is None else f"{x / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.rewards import RewardStage
    from services.world import build_learner, build_sampler

    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mem = Memory(device)
    cfg = train_config(args.pipeline, args.cpu, args.prompts, args.samples_per_prompt, args.micro_batch)
    p = cfg.policy
    print(f"config: {p.resolution} px, {p.dtype}, {p.num_steps} steps, shift {p.shift}, CFG {p.cfg_scale}, LoRA "
          f"r{p.lora.rank if p.lora else '-'} on {p.lora.target_modules if p.lora else '-'}, objective "
          f"{cfg.algorithm.name}, {args.prompts} prompts × {args.samples_per_prompt} samples, micro-batch "
          f"{args.micro_batch}", flush=True)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if mem.cuda else f"cpu ({os.cpu_count()} cores)",
                           "torch": torch.__version__, "python": platform.python_version(),
                           "pipeline": str(args.pipeline), "resolution": p.resolution, "dtype": p.dtype,
                           "steps": p.num_steps, "cfg_scale": p.cfg_scale, "lora_rank": p.lora.rank if p.lora else None,
                           "lora_targets": p.lora.target_modules if p.lora else None, "objective": cfg.algorithm.name,
                           "samples_per_iteration": args.prompts * args.samples_per_prompt,
                           "micro_batch": args.micro_batch}
    import diffusers

    out["diffusers"] = diffusers.__version__
    t = time.perf_counter()
    sampler = build_sampler(cfg)
    mem.sync()
    out["sampler_build_s"], out["sampler_resident_bytes"] = time.perf_counter() - t, mem.now()
    t = time.perf_counter()
    learner = build_learner(cfg)
    mem.sync()
    out["learner_build_s"] = time.perf_counter() - t
    out["learner_resident_bytes"] = None if not mem.cuda else mem.now() - out["sampler_resident_bytes"]
    reward = RewardStage(cfg.reward)
    print(f"built sampler in {out['sampler_build_s']:.1f} s ({gib(out['sampler_resident_bytes'])}), learner in "
          f"{out['learner_build_s']:.1f} s (+{gib(out['learner_resident_bytes'])})", flush=True)

    iterations: list[dict[str, Any]] = []
    for it in range(args.iterations):
        prompts = [PROMPTS[(it * args.prompts + i) % len(PROMPTS)] for i in range(args.prompts)]
        seeds = [1000 * it + i for i in range(args.prompts)]
        row: dict[str, Any] = {"iteration": it}

        traj = timed(mem, row, "rollout", lambda: sampler.rollout(prompts, args.samples_per_prompt, seeds))  # noqa: B023
        scored = timed(mem, row, "reward", lambda: reward.score(traj.images, traj.prompt_list()))  # noqa: B023
        rewards = torch.tensor(scored["scores"], dtype=torch.float32)
        stats = timed(mem, row, "update", lambda: learner.update(traj, rewards))  # noqa: B023
        payload = timed(mem, row, "publish", lambda: publish(learner, sampler))
        row["published_bytes"] = sum(v.numel() * v.element_size() for v in payload.state.values())
        row["version"] = payload.version
        row["samples"] = traj.size
        row["seconds"] = sum(row[f"{k}_s"] for k in ("rollout", "reward", "update", "publish"))
        row["samples_per_s"] = traj.size / row["seconds"]
        row["loss"], row["reward_mean"] = float(stats.get("loss", float("nan"))), float(rewards.mean())
        row["learner_phases_s"] = learner.step_phase_seconds
        iterations.append(row)
        print(f"iteration {it}: {traj.size} samples in {row['seconds']:.2f} s ({row['samples_per_s']:.2f} samples/s): "
              f"rollout {row['rollout_s']:.2f} s (peak {gib(row['rollout_peak_bytes'])}), reward {row['reward_s']:.2f} s, "
              f"update {row['update_s']:.2f} s (peak {gib(row['update_peak_bytes'])}), publish+apply "
              f"{row['publish_s']:.3f} s ({row['published_bytes'] / 1e6:.3g} MB, version {row['version']}); "
              f"loss {row['loss']:.4g}, reward {row['reward_mean']:.4g}", flush=True)
    reward.close()
    out["iterations"] = iterations
    steady = iterations[1:] or iterations  # the first iteration warms up kernels and the allocator
    out["steady"] = {k: statistics.median(r[k] for r in steady)
                     for k in ("seconds", "samples_per_s", "rollout_s", "reward_s", "update_s", "publish_s")}
    if mem.cuda:
        out["update_peak_bytes"] = max(r["update_peak_bytes"] for r in iterations)
        out["rollout_peak_bytes"] = max(r["rollout_peak_bytes"] for r in iterations)
        out["learner_rank_peak_bytes"] = out["update_peak_bytes"] - out["sampler_resident_bytes"]
        out["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    s = out["steady"]
    print(f"steady state (median of iterations {steady[0]['iteration']}..{steady[-1]['iteration']}): "
          f"{s['samples_per_s']:.2f} samples/s, {s['seconds']:.2f} s per iteration = rollout {s['rollout_s']:.2f} + "
          f"reward {s['reward_s']:.2f} + update {s['update_s']:.2f} + publish {s['publish_s']:.3f} s; learner-rank "
          f"peak {gib(out.get('learner_rank_peak_bytes'))}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", type=Path, required=True, help="a StableDiffusion3Pipeline directory "
                    "(`fmrl make-random-sd3 --size medium`, or --size tiny with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="the tiny CPU config (sd3_tiny_cpu), to validate the script")
    ap.add_argument("--iterations", type=int, help="default 4 (CPU: 2)")
    ap.add_argument("--prompts", type=int, help="prompts per iteration (default 4; CPU 2)")
    ap.add_argument("--samples-per-prompt", type=int, help="default 4 (CPU 2)")
    ap.add_argument("--micro-batch", type=int, help="learner micro-batch (default 4; CPU 4)")
    ap.add_argument("--results", type=Path, help="write the figures here (JSON)")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --cpu (with a tiny pipeline) to validate the script on a CPU")
    args.iterations = args.iterations or (2 if args.cpu else 4)
    args.prompts = args.prompts or (2 if args.cpu else 4)
    args.samples_per_prompt = args.samples_per_prompt or (2 if args.cpu else 4)
    args.micro_batch = args.micro_batch or 4
    t = time.perf_counter()
    out = run(args)
    out["wall_s"] = time.perf_counter() - t
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()

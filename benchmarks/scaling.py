"""A scaling estimate to 8, 64 and 512 GPUs from stage costs, with its assumptions stated.

Not a measurement: a model of one iteration, fed with the driver overhead measured by
benchmarks/pipeline.py (docs/pipeline.json) and with per-sample GPU costs from FLOPs
counted on an SD3.5-medium-sized transformer (benchmarks/gpu_rollout.count_flops, with
configs/sd3_medium.yaml's LoRA) at an assumed model FLOP utilisation (no GPU was lent to
measure them; benchmarks/gpu_rollout.py will). Every assumption is a named constant below
and is printed into docs/performance.md.

Model of one iteration (weak scaling: every inference GPU rolls out SAMPLES_PER_GPU):
    rollout   = SAMPLES_PER_GPU × t_rollout                       (all inference GPUs at once)
    reward    = B × t_reward / reward_gpus                        (B = G_inf × SAMPLES_PER_GPU)
    learn     = B × t_learn / G_train + all-reduce(G_train)           (DDP learner group, learner/group.py)
    all-reduce(N) = 2 (N − 1) / N × LoRA gradient bytes (fp32) / link bandwidth   (ring, once per optimiser step)
    sync      = payload / NCCL bandwidth                          (a pipelined broadcast: ~flat in N)
    driver    = CALLS_PER_SAMPLER × G_inf × call overhead         (one driver submits every call)
    lag 0:  T = rollout + reward + learn + sync + driver;  lag ≥ 1:  T = max(rollout, reward, learn + sync) + driver

    .venv/bin/python benchmarks/scaling.py
"""

from __future__ import annotations

import argparse
import json
import statistics

import yaml
from common import ROOT, write_section
from gpu_rollout import FULL_SHAPE, SD35_MEDIUM, count_flops

BEGIN, END = "<!-- scaling:begin -->", "<!-- scaling:end -->"

# ---- assumptions ------------------------------------------------------------------------
STEPS = 10                 # Euler steps per rollout
CFG = 2                    # classifier-free guidance doubles the rollout batch
PEAK = 989e12              # H100 SXM dense bf16 FLOP/s
MFU_ROLLOUT, MFU_LEARN = 0.40, 0.35
SAMPLES_PER_GPU = 64       # rollouts per inference GPU per iteration
T_REWARD = 0.010           # s per image on one GPU for a CLIP-L/14-sized scorer (≈ 80 GFLOP/image at ~1% of peak incl. preprocessing)
NCCL_BW = 25e9             # B/s of a broadcast over InfiniBand/NVLink between nodes
GRAD_BYTES = 4            # fp32 gradients of the LoRA adapter, all-reduced by DDP once per optimiser step
NVLINK_BW = 450e9          # B/s per GPU within a node (NVLink 4, H100 SXM: ~450 GB/s each way)
IB_BW = 50e9               # B/s per GPU between nodes (400 Gb/s InfiniBand per GPU)
GPUS_PER_NODE = 8          # a learner group of ≤ 8 ranks stays inside one node (NVLink)
STEPS_PER_ITERATION = 1    # learner.updates_per_batch (its default; configs/sd3_medium.yaml keeps it)
CALLS_PER_SAMPLER = 3      # rollout (+ its metadata read) and one weights apply per iteration


def counted() -> dict[str, float]:
    """The counted FLOPs and parameters at 512 px with configs/sd3_medium.yaml's LoRA."""
    lora = yaml.safe_load((ROOT / "configs" / "sd3_medium.yaml").read_text())["policy"]["lora"]
    return count_flops(SD35_MEDIUM, FULL_SHAPE, lora["rank"], lora["target_modules"]) | {"rank": lora["rank"]}


def per_sample(c: dict[str, float]) -> tuple[float, float]:
    """Seconds per image on one GPU: rollout (STEPS forwards with CFG) and one learner sample
    (the LoRA forward + backward, plus the W2 term's anchor forward: π_old's adapter or the reference)."""
    return STEPS * CFG * c["fwd"] / (PEAK * MFU_ROLLOUT), (c["train"] + c["fwd"]) / (PEAK * MFU_LEARN)


def allreduce_s(learners: int, grad_bytes: float) -> float:
    """Seconds of one ring all-reduce of the gradients over ``learners`` ranks: each rank sends and
    receives 2 (N − 1) / N × the bytes, over NVLink inside a node, InfiniBand across nodes."""
    if learners <= 1:
        return 0.0
    bw = NVLINK_BW if learners <= GPUS_PER_NODE else IB_BW
    return 2 * (learners - 1) / learners * grad_bytes / bw


def iteration(g: int, g_train: int, g_reward: float, lag: int, payload: float, call_s: float,
              data_parallel: bool, t_roll: float, t_learn: float, grad_bytes: float) -> dict[str, float]:
    g_inf = g - g_train
    b = g_inf * SAMPLES_PER_GPU
    learners = g_train if data_parallel else 1
    parts = {"rollout": SAMPLES_PER_GPU * t_roll, "reward": b * T_REWARD / g_reward,
             "learn": b * t_learn / learners + STEPS_PER_ITERATION * allreduce_s(learners, grad_bytes),
             "sync": payload / NCCL_BW, "driver": CALLS_PER_SAMPLER * g_inf * call_s}
    serial = sum(parts.values())
    overlapped = max(parts["rollout"], parts["reward"], parts["learn"] + parts["sync"]) + parts["driver"]
    t = serial if lag == 0 else overlapped
    return {**parts, "g_inf": g_inf, "batch": b, "iteration_s": t, "images_per_s": b / t,
            "ideal_images_per_s": g_inf / t_roll}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    measured = json.loads((ROOT / "docs" / "pipeline.json").read_text())
    call_s = statistics.median(r["empty_call_s"] for r in measured)
    c = counted()
    t_roll, t_learn = per_sample(c)
    lora, full = 2 * c["lora_params"], 2 * c["params"]  # bf16 bytes
    grads = GRAD_BYTES * c["lora_params"]
    reduce = {n: allreduce_s(n, grads) for n in (2, 8, 64)}
    lines = ["| GPUs | design | inference / training GPUs | batch | rollout | reward | learn | sync | driver "
             "| iteration (lag 0 / lag 1) | images/s (lag 1) | share of inference GPUs busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for g in (8, 64, 512):
        # one learner: a single learner actor on one training GPU, one reward actor sharing a GPU
        # learner group (built: learner/group.py): training GPUs sized to the rollout cost, N DDP
        # learner ranks (rank 0 publishes), rewards on 1/16 of the GPUs
        ratio = t_roll / t_learn  # inference GPUs one training GPU keeps up with
        g_train = max(1, round(g / (1 + ratio)))
        for design, gt, gr, dp in (("one learner", 1, 1.0, False),
                                   ("learner group (DDP)", g_train, max(1, g / 16), True)):
            r0 = iteration(g, gt, gr, 0, lora, call_s, dp, t_roll, t_learn, grads)
            r1 = iteration(g, gt, gr, 1, lora, call_s, dp, t_roll, t_learn, grads)
            rows[g, dp] = r1
            lines.append(
                f"| {g} | {design} | {int(r1['g_inf'])} / {gt} | {int(r1['batch'])} | {r1['rollout']:.1f} s "
                f"| {r1['reward']:.1f} s | {r1['learn']:.1f} s | {r1['sync'] * 1e3:.1f} ms | {r1['driver'] * 1e3:.0f} ms "
                f"| {r0['iteration_s']:.1f} / {r1['iteration_s']:.1f} s | {r1['images_per_s']:.0f} "
                f"| {r1['images_per_s'] / r1['ideal_images_per_s']:.0%} |")
    text = (
        "An estimate, not a measurement (`.venv/bin/python benchmarks/scaling.py`; model and constants in "
        "the script). Inputs: the driver's per-call overhead measured by benchmarks/pipeline.py "
        f"({call_s * 1e3:.2f} ms on this machine); per-image GPU costs from FLOPs counted on an "
        f"SD3.5-medium-sized transformer ({c['params'] / 1e9:.2f} B parameters, {c['tokens']} tokens at 512 px; "
        f"one forward {c['fwd'] / 1e12:.3f} TFLOP, one LoRA forward + backward {c['train'] / 1e12:.3f} TFLOP "
        f"with configs/sd3_medium.yaml's adapter): a rollout of {STEPS} steps with CFG is {t_roll:.3f} s at "
        f"{MFU_ROLLOUT:.0%} MFU of an H100's {PEAK / 1e12:.0f} TFLOP/s, one learner sample (LoRA forward + "
        f"backward + the W2 anchor forward) {t_learn * 1e3:.0f} ms at {MFU_LEARN:.0%}; {SAMPLES_PER_GPU} "
        f"rollouts per inference GPU per iteration; LoRA r{c['rank']} weights ({c['lora_params'] / 1e6:.1f} M, "
        f"{lora / 1e6:.0f} MB bf16; full weights would be {full / 1e9:.1f} GB, "
        f"{full / NCCL_BW:.2f} s) broadcast at {NCCL_BW / 1e9:.0f} GB/s; a CLIP-sized reward at "
        f"{T_REWARD * 1e3:.0f} ms per image per GPU. The learner group all-reduces the adapter's fp32 "
        f"gradients ({grads / 1e6:.1f} MB) once per optimiser step (DDP; micro-batches accumulate locally): "
        f"a ring moves 2 (N − 1) / N × that per rank, at an assumed {NVLINK_BW / 1e9:.0f} GB/s (NVLink) "
        f"inside a node of {GPUS_PER_NODE} and {IB_BW / 1e9:.0f} GB/s (400 Gb/s InfiniBand) between nodes: "
        f"{reduce[2] * 1e3:.2f} ms at 2 learners, {reduce[8] * 1e3:.2f} ms at 8 (one node), "
        f"{reduce[64] * 1e3:.2f} ms at 64 (eight nodes).\n\n" + "\n".join(lines) + "\n\n"
        f"What it says: one inference GPU produces an image every {t_roll:.3f} s and one training GPU "
        f"consumes one every {t_learn * 1e3:.0f} ms, so a single learner GPU keeps up with about "
        f"{t_roll / t_learn:.0f} inference GPUs. With one learner (N = 1, one reward actor) the runtime "
        f"keeps {rows[8, False]['images_per_s'] / rows[8, False]['ideal_images_per_s']:.0%} of 7 inference GPUs "
        "busy at 8 GPUs with lag 1; at 64 and 512 GPUs the single learner caps it at "
        f"{rows[512, False]['images_per_s']:.0f} images/s whatever the cluster. Past 8 GPUs the learner "
        "is the learner group (built: N DDP learner ranks, learner/group.py; rank 0 publishes and "
        "checkpoints), learner throughput × N less one gradient all-reduce per step — "
        f"{reduce[64] * 1e3:.1f} ms at 64 learners against a learn stage of "
        f"{rows[64, True]['learn']:.1f} s, so the all-reduce is not what limits it — with rewards scaled "
        "out (Redis reward services already scale horizontally, docs/rewards.md); then "
        f"{rows[512, True]['images_per_s'] / rows[512, True]['ideal_images_per_s']:.0%} of the inference GPUs "
        f"stay busy at 512. The one driver's calls cost {rows[512, True]['driver']:.1f} s per iteration at "
        f"512 GPUs ({rows[512, True]['driver'] / rows[512, True]['iteration_s']:.0%} of it): a tree of "
        "sub-drivers would be the next step beyond that. LoRA weight sync is milliseconds; full weights "
        f"would add {full / NCCL_BW:.2f} s per version, which max_policy_lag ≥ 1 hides behind the next rollout. "
        "Lag 1 nearly halves the iteration against lag 0 once the stages are balanced."
    )
    print(text)
    if not args.no_write:
        write_section(BEGIN, END, "## Scaling estimate (issue 5)", text)


if __name__ == "__main__":
    main()

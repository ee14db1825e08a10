"""GPU rollout and learner throughput of an SD3.5-medium-sized transformer: images/s, peak memory, MFU.

An ``SD3Transformer2DModel`` built from SD3.5-medium's config with random weights (none are
needed to time it), 512 px images (latents (B, 16, 64, 64)), 333 text tokens of width 4096
(77 CLIP + 256 T5) and a pooled vector of 2048, random; 10 Euler steps, shift 3, CFG 4.5,
bf16. For each batch size it measures

- the sampler path: the project's ``euler_rollout(SD3Velocity(transformer), ...)`` (CFG's two
  passes batched into one call), and diffusers' own ``StableDiffusion3Pipeline`` loop on the same
  transformer (text encoders and VAE left out, prompt embeddings passed in, ``output_type=
  "latent"``): images/s, peak GPU memory, model FLOP utilisation, and the ratio ours / diffusers;
- before/after rows for the sampler (``--ablation-batches``): CFG as two passes (before batching),
  the SDPA math backend (before fused attention), one CUDA graph per input shape replayed each
  step, and with ``--compile`` ``torch.compile`` (default mode, and reduce-overhead = CUDA graphs).
  diffusers' ``fuse_qkv_projections()`` is not offered: FUSED_QKV below says why;
- one learner update with LoRA (peft through the transformer's ``add_adapter``; base frozen):
  forward + backward of a flow-matching MSE on (x_t, t, cond) + one AdamW step; samples/s, peak
  memory, MFU. A batch that runs out of memory is retried with gradient checkpointing.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward
(and one LoRA forward + backward) at batch 1 of the same config on the meta device (shapes only,
attention included as the math path's matmuls), times the batch. MFU = achieved FLOP/s ÷ the
device's dense bf16 peak from a small table (unknown device: N/A); the GPU's measured 8192³ bf16
matmul rate is printed beside it as the reachable ceiling.

    .venv/bin/python benchmarks/gpu_rollout.py --write-docs            # on a CUDA GPU (estimate: ~5 min on an H100)
    .venv/bin/python benchmarks/gpu_rollout.py --compile --parts ablation  # torch.compile rows (+ 1-2 min per compile)
    .venv/bin/python benchmarks/gpu_rollout.py --tiny                  # CPU smoke run of the script, seconds
    .venv/bin/python benchmarks/gpu_rollout.py --full-cpu-check        # full-size model built on CPU (bf16)

``--results FILE`` keeps rows across invocations (so a long run can be split over several
commands), and ``--write-docs`` renders all of them into docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, also where fmrl is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import machine, write_section  # noqa: E402

from samplers.sd3 import SD35_MEDIUM  # noqa: E402

BEGIN, END = "<!-- gpu-rollout:begin -->", "<!-- gpu-rollout:end -->"
HEADING = "## GPU rollout and learner throughput (SD3.5-medium size)"

# SD3.5-medium's transformer: one copy, in samplers/sd3.py (also what `fmrl make-random-sd3 --size medium` builds)
TINY: dict[str, Any] = {
    "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
    "caption_projection_dim": 32, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
    "dual_attention_layers": (0,), "qk_norm": "rms_norm",
}
# (latent side, text tokens): 512 px / 8 = 64; 77 CLIP + 256 T5 tokens
FULL_SHAPE, TINY_SHAPE = (64, 333), (16, 12)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

FUSED_QKV = ("diffusers' `fuse_qkv_projections()` is left out: in diffusers 0.42.1 its "
             "`FusedJointAttnProcessor2_0` raises on SD3.5's dual-attention blocks (attn2 gets no encoder "
             "states: `'NoneType' object has no attribute 'ndim'`) and skips the q/k RMSNorm (qk_norm), so "
             "on SD3.5 it would compute another function.")

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order on the device name
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0)]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in name.lower()), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None, Any]:
    """Median seconds of ``fn`` after ``warmup`` calls, the peak memory (bytes) of the timed
    calls (CUDA only; the allocator's peak is reset after the warm-up) and the last result."""
    for _ in range(warmup):
        out = fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak, out


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float | None:
    """TFLOP/s of an 8192³ matmul in ``dtype`` on random data (CUDA only): the reachable rate."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12


# ---- the model, its inputs and its FLOPs -------------------------------------------------------

def build_transformer(config: dict[str, Any], device: torch.device | str, dtype: torch.dtype):  # noqa: ANN201
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        tr = SD3Transformer2DModel(**config)
    return tr.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_inputs(config: dict[str, Any], shape: tuple[int, int], batch: int, device: torch.device,
                dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Noise (B, 16, L, L) and random conditional / unconditional prompt embeddings."""
    from samplers.text import PromptEmbeddings

    g = torch.Generator().manual_seed(seed)
    side, tokens = shape

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    def emb() -> PromptEmbeddings:
        return PromptEmbeddings(rnd(batch, tokens, config["joint_attention_dim"]),
                                rnd(batch, config["pooled_projection_dim"]))

    return {"noise": rnd(batch, config["in_channels"], side, side), "cond": emb(), "uncond": emb(),
            "x0": rnd(batch, config["in_channels"], side, side), "eps": rnd(batch, config["in_channels"], side, side)}


def count_flops(config: dict[str, Any], shape: tuple[int, int], lora_rank: int,
                targets: list[str]) -> dict[str, float]:
    """FLOPs of one forward and of one LoRA forward + backward at batch 1, counted by
    FlopCounterMode on the meta device; and the parameter counts."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = SD3Transformer2DModel(**config)
    params = sum(p.numel() for p in m.parameters())
    buffers = sum(b.numel() for b in m.buffers())
    side, tokens = shape

    def kw() -> dict[str, Any]:
        return {"hidden_states": torch.randn(1, config["in_channels"], side, side, device="meta"),
                "encoder_hidden_states": torch.randn(1, tokens, config["joint_attention_dim"], device="meta"),
                "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device="meta"),
                "timestep": torch.ones(1, device="meta"), "return_dict": False}

    with FlopCounterMode(display=False) as fc:
        m(**kw())
    fwd = fc.get_total_flops()
    by_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    m.requires_grad_(False)
    m.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets, init_lora_weights=True))
    lora_params = sum(p.numel() for p in m.parameters() if p.requires_grad)
    with FlopCounterMode(display=False) as fc:
        out = m(**kw())[0]
        out.float().pow(2).mean().backward()
    train = fc.get_total_flops()
    return {"params": params, "pos_embed_buffer": buffers, "lora_params": lora_params, "fwd": fwd,
            "train": train, "attention_fwd": by_op.get("aten.bmm", 0), "tokens": (side // config["patch_size"]) ** 2 + tokens}


# ---- sampler variants --------------------------------------------------------------------------

class SequentialCFG(torch.nn.Module):
    """CFG as two separate passes (conditional, then unconditional): the 'before' of batching."""

    def __init__(self, velocity: torch.nn.Module, uncond: Any, scale: float) -> None:  # noqa: ANN401
        super().__init__()
        self.velocity, self.uncond, self.scale = velocity, uncond, scale

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:  # noqa: ANN401
        v_c = self.velocity(x_t, t, cond)
        v_u = self.velocity(x_t, t, self.uncond)
        return v_u + self.scale * (v_c - v_u)


class CudaGraphed(torch.nn.Module):
    """The eager transformer captured once per input shape into a CUDA graph and replayed:
    inputs are copied into the graph's static buffers, the output is cloned out of it."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.inner = transformer
        self.config = transformer.config
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def _run(self, a: list[torch.Tensor]) -> torch.Tensor:
        return self.inner(hidden_states=a[0], encoder_hidden_states=a[1], pooled_projections=a[2],
                          timestep=a[3], return_dict=False)[0]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False) -> tuple:
        args = [hidden_states, encoder_hidden_states, pooled_projections, timestep]
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run(static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for s, a in zip(static, args, strict=True):
            s.copy_(a)
        graph.replay()
        return (out.clone(),)


def rollout_fn(velocity: torch.nn.Module, inp: dict[str, Any], steps: int, shift: float,
               cfg: float, sequential_cfg: bool = False) -> Callable[[], torch.Tensor]:
    from samplers.rollout import euler_rollout

    if sequential_cfg and cfg != 1.0:
        model, scale, uncond = SequentialCFG(velocity, inp["uncond"], cfg), 1.0, None
    else:
        model, scale, uncond = velocity, cfg, inp["uncond"]

    def run() -> torch.Tensor:
        states, _ = euler_rollout(model, inp["noise"], inp["cond"], num_steps=steps, shift=shift,
                                  cfg_scale=scale, uncond=uncond)
        return states[:, -1]

    return run


def diffusers_fn(transformer: torch.nn.Module, inp: dict[str, Any], steps: int, shift: float,
                 cfg: float) -> Callable[[], torch.Tensor]:
    """diffusers' StableDiffusion3Pipeline around the same transformer: no text encoders,
    tokenizers or VAE (diffusers 0.42 accepts None for each), embeddings and latents passed in."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    px = inp["noise"].shape[-1] * pipe.vae_scale_factor

    def run() -> torch.Tensor:
        return pipe(prompt_embeds=inp["cond"].tokens, pooled_prompt_embeds=inp["cond"].pooled,
                    negative_prompt_embeds=inp["uncond"].tokens,
                    negative_pooled_prompt_embeds=inp["uncond"].pooled, latents=inp["noise"],
                    num_inference_steps=steps, guidance_scale=cfg, height=px, width=px,
                    output_type="latent", return_dict=False)[0]

    return run


def learner_update(velocity: torch.nn.Module, opt: torch.optim.Optimizer, x_t: torch.Tensor, t: torch.Tensor,
                   cond: Any, target: torch.Tensor) -> Callable[[], torch.Tensor]:  # noqa: ANN401
    """One LoRA learner step: flow-matching MSE forward, backward, AdamW step."""

    def update() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(velocity(x_t, t, cond).float(), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return update


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- the benchmark -----------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 flops: dict[str, float]) -> None:
        self.args, self.device, self.dtype, self.flops = args, device, dtype, flops
        self.peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.rows: list[dict[str, Any]] = []
        self.reference: dict[int, torch.Tensor] = {}  # eager ours' final samples, by batch
        cfg_passes = 2 if args.cfg != 1.0 else 1
        self.flops_per_image = args.steps * cfg_passes * flops["fwd"]

    def record(self, part: str, variant: str, batch: int, fn: Callable[[], Any], flops_per_item: float,
               warmup: int = 1, check: torch.Tensor | None = None, note: str = "") -> Any:  # noqa: ANN401
        """Time ``fn`` (one call handles ``batch`` items) and append a row; failures become rows."""
        row: dict[str, Any] = {"part": part, "variant": variant, "batch": batch, "note": note}
        out = None
        try:
            t0 = time.perf_counter()
            sec, peak, out = measure(fn, self.device, warmup, self.args.repeats)
            rate = batch / sec
            row.update(seconds=sec, rate=rate, peak_gib=None if peak is None else peak / 2**30,
                       tflops=rate * flops_per_item / 1e12, wall_s=time.perf_counter() - t0)
            row["mfu"] = row["tflops"] / self.peak if self.peak else None
            if check is not None and isinstance(out, torch.Tensor):
                row["rel_diff"] = rel_diff(out, check)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as exc:  # one broken variant must not lose the rest of a GPU run
            if self.args.tiny:
                raise
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        self.rows.append(row)
        print(fmt_row(row), flush=True)
        free_memory(self.device)
        return out

    def inputs(self, batch: int) -> dict[str, Any]:
        return make_inputs(self.args.model_config, self.args.shape, batch, self.device, self.dtype, seed=batch)

    def sampler(self, tr: torch.nn.Module, batches: list[int]) -> None:
        from samplers.policy import SD3Velocity

        a = self.args
        for b in batches:
            inp = self.inputs(b)
            out = self.record("sampler", "ours", b, rollout_fn(SD3Velocity(tr), inp, a.steps, a.shift, a.cfg),
                              self.flops_per_image)
            if isinstance(out, torch.Tensor):
                self.reference[b] = out.clone()
            if "diffusers" in a.parts:
                self.record("sampler", "diffusers", b, diffusers_fn(tr, inp, a.steps, a.shift, a.cfg),
                            self.flops_per_image, check=self.reference.get(b))
            del inp

    def ablations(self, tr: torch.nn.Module, batches: list[int]) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from samplers.policy import SD3Velocity

        a, cuda = self.args, self.device.type == "cuda"
        for b in batches:
            if b not in self.reference:
                self.sampler(tr, [b])
        for b in batches:
            inp, ref = self.inputs(b), self.reference.get(b)
            self.record("ablation", "CFG as two passes", b,
                        rollout_fn(SD3Velocity(tr), inp, a.steps, a.shift, a.cfg, sequential_cfg=True),
                        self.flops_per_image, check=ref)
            eager = rollout_fn(SD3Velocity(tr), inp, a.steps, a.shift, a.cfg)

            def math_attention(run: Callable[[], torch.Tensor] = eager) -> torch.Tensor:
                with sdpa_kernel(SDPBackend.MATH):
                    return run()

            self.record("ablation", "SDPA math backend (unfused attention)", b, math_attention,
                        self.flops_per_image, check=ref)
            if cuda:
                graphed = CudaGraphed(tr)
                self.record("ablation", "CUDA graph per shape (eager model)", b,
                            rollout_fn(SD3Velocity(graphed), inp, a.steps, a.shift, a.cfg),
                            self.flops_per_image, check=ref)
                del graphed
            del inp
            free_memory(self.device)
        if a.compile:
            modes = ["default", "reduce-overhead"] if cuda else ["default"]
            for mode in modes:
                torch._dynamo.reset()
                compiled = torch.compile(tr, mode=mode, dynamic=False)
                label = "torch.compile" + (" reduce-overhead (CUDA graphs)" if mode == "reduce-overhead" else "")
                for b in batches:
                    inp = self.inputs(b)
                    run = rollout_fn(SD3Velocity(compiled), inp, a.steps, a.shift, a.cfg)
                    t = time.perf_counter()
                    try:  # the first rollout compiles (and records the CUDA graphs)
                        run()
                        sync(self.device)
                        note = f"compile + first rollout {time.perf_counter() - t:.0f} s"
                    except Exception as exc:
                        if a.tiny:
                            raise
                        note = f"compile failed: {type(exc).__name__}"
                    self.record("ablation", label, b, run, self.flops_per_image, warmup=2,
                                check=self.reference.get(b), note=note)
                    del inp, run
                del compiled
                torch._dynamo.reset()
                free_memory(self.device)

    def learner(self, tr: torch.nn.Module, batches: list[int]) -> None:
        from samplers.flow import interpolate, sample_training_times, velocity_target
        from samplers.policy import SD3Velocity, add_lora

        a = self.args
        # the learner's own LoRA: float32 adapters on the bf16 base, as training runs them
        velocity = add_lora(SD3Velocity(tr), a.lora_rank, a.lora_rank, a.lora_targets)
        params = [p for p in tr.parameters() if p.requires_grad]
        print(f"LoRA r={a.lora_rank} on {a.lora_targets}: {sum(p.numel() for p in params):,} "
              f"trainable parameters, dtype {sorted({str(p.dtype) for p in params})}", flush=True)
        tr.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        per_sample = self.flops["train"]
        for b in batches:
            inp = self.inputs(b)
            t = sample_training_times(b, torch.Generator().manual_seed(b)).to(self.device)
            x_t = interpolate(inp["x0"], inp["eps"], t).to(self.dtype)
            target = velocity_target(inp["x0"], inp["eps"]).float()

            update = learner_update(velocity, opt, x_t, t, inp["cond"], target)
            self.record("learner", "LoRA update", b, update, per_sample)
            if self.rows[-1].get("error") == "OOM" or a.grad_ckpt:
                tr.enable_gradient_checkpointing()
                self.record("learner", "LoRA update, gradient checkpointing", b, update, per_sample,
                            note="MFU counts model FLOPs, not the recomputation")
                tr.disable_gradient_checkpointing()
            del inp, x_t, target, update
            opt.zero_grad(set_to_none=True)
            free_memory(self.device)


def fmt(v: float | None, spec: str) -> str:
    return "N/A" if v is None else format(v, spec)


def fmt_row(r: dict[str, Any]) -> str:
    head = f"[{r['part']}] {r['variant']}, batch {r['batch']}: "
    if "error" in r:
        return head + r["error"]
    unit = "samples/s" if r["part"] == "learner" else "images/s"
    s = (f"{head}{r['rate']:.3f} {unit} ({r['seconds']:.3f} s per call), peak {fmt(r['peak_gib'], '.2f')} GiB, "
         f"{r['tflops']:.3f} TFLOP/s, MFU {fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}%")
    if "rel_diff" in r:
        s += f", rel. diff vs ours {r['rel_diff']:.2e}"
    return s + (f" ({r['note']})" if r.get("note") else "")


# ---- docs --------------------------------------------------------------------------------------

def cell_rate(r: dict[str, Any] | None, spec: str = ".2f") -> str:
    if r is None:
        return "—"
    return r["error"] if "error" in r else format(r["rate"], spec)


def cell(r: dict[str, Any] | None, key: str, spec: str, scale: float = 1.0) -> str:
    if r is None or "error" in r or r.get(key) is None:
        return "—" if r is None or "error" in r else "N/A"
    return format(r[key] * scale, spec)


def tables(rows: list[dict[str, Any]], spec: str) -> str:
    find = {(r["part"], r["variant"], r["batch"]): r for r in rows}
    out = []
    batches = sorted({r["batch"] for r in rows if r["part"] == "sampler"})
    if batches:
        out += ["| batch | ours images/s | diffusers images/s | ours ÷ diffusers | ours peak (GiB) | diffusers peak (GiB) "
                "| ours TFLOP/s | ours MFU | diffusers MFU | ours vs diffusers latents (rel. diff) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for b in batches:
            o, d = find.get(("sampler", "ours", b)), find.get(("sampler", "diffusers", b))
            ratio = (f"{o['rate'] / d['rate']:.2f}" if o and d and "error" not in o and "error" not in d else "—")
            out.append(f"| {b} | {cell_rate(o, spec)} | {cell_rate(d, spec)} | {ratio} | {cell(o, 'peak_gib', '.1f')} "
                       f"| {cell(d, 'peak_gib', '.1f')} | {cell(o, 'tflops', '.3g')} | {cell(o, 'mfu', '.1%')} "
                       f"| {cell(d, 'mfu', '.1%')} | {cell(d, 'rel_diff', '.1e')} |")
    abl = [r for r in rows if r["part"] == "ablation"]
    if abl:
        out += ["", "Sampler before/after (× = images/s ÷ eager `ours` at the same batch; rel. diff = "
                "‖sample − eager ours' sample‖ / ‖eager ours' sample‖):", "",
                "| variant | batch | images/s | × eager ours | peak (GiB) | MFU | rel. diff | note |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sorted(abl, key=lambda r: (r["variant"], r["batch"])):
            base = find.get(("sampler", "ours", r["batch"]))
            x = (f"{r['rate'] / base['rate']:.2f}" if base and "error" not in base and "error" not in r else "—")
            out.append(f"| {r['variant']} | {r['batch']} | {cell_rate(r, spec)} | {x} | {cell(r, 'peak_gib', '.1f')} "
                       f"| {cell(r, 'mfu', '.1%')} | {cell(r, 'rel_diff', '.1e')} | {r.get('note', '')} |")
    lrn = [r for r in rows if r["part"] == "learner"]
    if lrn:
        out += ["", "| learner update | batch | samples/s | peak (GiB) | TFLOP/s | MFU | note |",
                "|---|---|---|---|---|---|---|"]
        for r in sorted(lrn, key=lambda r: (r["batch"], r["variant"])):
            out.append(f"| {r['variant']} | {r['batch']} | {cell_rate(r, spec)} | {cell(r, 'peak_gib', '.1f')} "
                       f"| {cell(r, 'tflops', '.3g')} | {cell(r, 'mfu', '.1%')} | {r.get('note', '')} |")
    return "\n".join(out)


def describe_machine(device: torch.device) -> str:
    try:
        base = machine()
    except ImportError:  # common.machine() reads ray's version; the GPU image has no ray
        base = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    if device.type == "cuda":
        import diffusers

        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), {base}, diffusers {diffusers.__version__}"
    return base


def flop_text(full: dict[str, float], cfg: float, steps: int) -> str:
    per_image = steps * (2 if cfg != 1.0 else 1) * full["fwd"]
    return (f"Counted FLOPs of the full-size model (FlopCounterMode, meta device, batch 1): "
            f"{full['params'] / 1e9:.3f} B parameters (+ {full['pos_embed_buffer'] / 1e6:.0f} M in the "
            f"positional-embedding buffer, which SD3.5-medium's quoted 2.5 B includes), {full['tokens']:.0f} tokens "
            f"(1024 image + 333 text); one forward {full['fwd'] / 1e12:.3f} TFLOP ({full['attention_fwd'] / 1e12:.3f} "
            f"of it attention), so one 512-px image with {steps} steps and CFG {cfg} costs {per_image / 1e12:.1f} TFLOP; "
            f"one LoRA update (r=32, {full['lora_params'] / 1e6:.1f} M trainable) forward + backward "
            f"{full['train'] / 1e12:.3f} TFLOP per sample ({full['train'] / full['fwd']:.2f}× a forward, not the 3× of "
            f"full training: the frozen base needs no weight gradients). At a dense bf16 peak of 989 TFLOP/s (H100 SXM, H200) "
            f"that bounds the sampler at {989e12 / per_image:.1f} images/s and the learner at "
            f"{989e12 / full['train']:.0f} samples/s; at the ~790 TFLOP/s an 8192³ bf16 matmul reaches on "
            f"an H100/H200 (a figure given for the machines this project may be lent, not measured here), {790e12 / per_image:.1f} images/s and "
            f"{790e12 / full['train']:.0f} samples/s.")


WHEELS = ("where the image has torch, peft and transformers but not diffusers (nor ray or pydantic, which "
          "this script does not need): `pip download --no-deps --only-binary=:all: --python-version 3.12 "
          "--platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata` on a connected machine, carry `.whl`, "
          "and there `python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl; "
          "export PYTHONPATH=/tmp/site` before `python3 benchmarks/gpu_rollout.py --write-docs`")


def docs_text(args: argparse.Namespace, rows: list[dict[str, Any]], device: torch.device,
              full: dict[str, float], minutes: float, ceiling: float | None) -> str:
    cmd = "`.venv/bin/python benchmarks/gpu_rollout.py " + " ".join(sys.argv[1:]) + "`"
    if device.type == "cuda":
        head = (f"Measured by {cmd} on {describe_machine(device)}, {time.strftime('%Y-%m-%d')}, in {minutes:.1f} min: "
                f"SD3.5-medium-sized transformer, random weights, {args.dtype}, 512 px (latents 16×64×64), "
                f"333 text tokens, {args.steps} Euler steps, shift {args.shift}, CFG {args.cfg} (two passes batched "
                f"into one call); median of {args.repeats} calls after a warm-up; peak = "
                f"`torch.cuda.max_memory_allocated` over the timed calls (weights included). MFU = counted "
                f"model FLOPs × rate ÷ the dense bf16 peak of the device (table in the script); an 8192³ bf16 "
                f"matmul ran at {fmt(ceiling, '.0f')} TFLOP/s here. diffusers' row is `StableDiffusion3Pipeline` "
                f"around the same transformer (no text encoders or VAE, embeddings passed in, latent output). "
                f"Learner: LoRA r={args.lora_rank} on {', '.join(args.lora_targets)}, base frozen, AdamW, "
                f"flow-matching MSE on (x_t, t, cond). In bf16 ours and diffusers' latents differ slightly by "
                f"construction: `SD3Velocity` rounds t to bf16 before ×1000 (steps of 4 near 1000) where "
                f"diffusers passes fp32 timesteps, and diffusers' scheduler steps in fp32. {FUSED_QKV}\n\n{flop_text(full, args.cfg, args.steps)}\n\n"
                + tables(rows, ".2f"))
        return head
    return (
        "**No GPU was lent to this task yet, so this section has no GPU figures.** On a CUDA machine "
        "`.venv/bin/python benchmarks/gpu_rollout.py --write-docs` produces them (on an offline machine "
        f"{WHEELS}; add `--compile --parts ablation --results FILE` for the torch.compile rows). It will report, "
        "for batch 1, 2, 4, 8, 16, 32 on an SD3.5-medium-sized transformer (random weights, bf16, 512 px, "
        f"10 steps, shift 3, CFG 4.5): images/s, peak memory and MFU of the project's sampler "
        "(`euler_rollout` + `SD3Velocity`) and of diffusers' `StableDiffusion3Pipeline` loop on the same "
        "transformer, their ratio and the relative difference of their latents; before/after rows for the "
        "sampler (CFG as two passes vs batched, SDPA math vs fused attention, a CUDA graph per shape, "
        "torch.compile with and without CUDA graphs); and samples/s, peak memory and MFU of one LoRA learner "
        f"update (a batch that runs out of memory is retried with gradient checkpointing). {FUSED_QKV}\n\n"
        f"{flop_text(full, 4.5, 10)} (These bounds are arithmetic on counted FLOPs, not measurements.)\n\n"
        f"**Smoke run of the script, not a performance figure**: {cmd} on {describe_machine(device)}, "
        f"{time.strftime('%Y-%m-%d')}, in {minutes:.1f} min — a {args.model_config['num_layers']}-layer "
        f"transformer of width {args.model_config['num_attention_heads'] * args.model_config['attention_head_dim']}, "
        f"{args.dtype}, latents 16×{args.shape[0]}×{args.shape[0]}, {args.shape[1]} text tokens, {args.steps} steps, on the "
        "CPU (no peak memory, no MFU). It shows that every path runs and that ours and diffusers' loop "
        "compute the same latents.\n\n" + tables(rows, ".1f"))


# ---- entry points ------------------------------------------------------------------------------

def full_cpu_check(args: argparse.Namespace) -> None:
    """Build the full-size model on the CPU in bf16 once, count its parameters and run one
    forward at a small resolution (the 512 px forward costs ~2.4 TFLOP: minutes on a CPU)."""
    torch.manual_seed(0)
    t = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: 4.5 GB instead of 9 GB
    try:
        tr = build_transformer(SD35_MEDIUM, "cpu", torch.bfloat16)
    finally:
        torch.set_default_dtype(prev)
    n = sum(p.numel() for p in tr.parameters())
    nb = sum(b.numel() for b in tr.buffers())
    print(f"full-size transformer built on the CPU in {time.perf_counter() - t:.1f} s: {n / 1e9:.3f} B parameters "
          f"(+ {nb / 1e6:.1f} M buffer elements, the positional-embedding table), {len(tr.transformer_blocks)} blocks, "
          f"{sum(b.attn2 is not None for b in tr.transformer_blocks)} with dual attention, "
          f"inner dim {tr.inner_dim}", flush=True)
    inp = make_inputs(SD35_MEDIUM, (16, 16), 1, torch.device("cpu"), torch.bfloat16, seed=0)
    from samplers.policy import SD3Velocity

    t = time.perf_counter()
    with torch.no_grad():
        v = SD3Velocity(tr)(inp["noise"], torch.tensor([0.5]), inp["cond"])
    print(f"one forward at latents 16×16×16 + 16 text tokens: {tuple(v.shape)}, finite {bool(v.isfinite().all())}, "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    del tr, v
    gc.collect()
    full = count_flops(SD35_MEDIUM, FULL_SHAPE, args.lora_rank, args.lora_targets)
    print(flop_text(full, args.cfg, args.steps or 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small config, fp32, CPU, batches 1 2, 2 steps")
    ap.add_argument("--full-cpu-check", action="store_true", help="build the full-size model on the CPU and exit")
    ap.add_argument("--batches", type=int, nargs="+", help="default 1 2 4 8 16 32 (tiny: 1 2)")
    ap.add_argument("--learner-batches", type=int, nargs="+", help="default: --batches")
    ap.add_argument("--ablation-batches", type=int, nargs="+", help="default 1 8 32 (tiny: 1 2)")
    ap.add_argument("--parts", nargs="+", default=["sampler", "diffusers", "ablation", "learner"],
                    choices=["sampler", "diffusers", "ablation", "learner"])
    ap.add_argument("--steps", type=int, help="Euler steps (default 10; tiny 2)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 (tiny: fp32)")
    ap.add_argument("--cfg", type=float, default=4.5, help="CFG scale (1 = no CFG)")
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows to the before/after table")
    ap.add_argument("--grad-ckpt", action="store_true", help="also time the learner with gradient checkpointing")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--lora-targets", nargs="+", default=LORA_TARGETS)
    ap.add_argument("--device", help="default cuda when there is one, else cpu (tiny only)")
    ap.add_argument("--results", type=Path, help="JSON file that keeps rows across invocations")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    if args.full_cpu_check:
        full_cpu_check(args)
        return
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.tiny and device.type != "cuda":
        sys.exit("the full-size benchmark needs a CUDA GPU: use --tiny for a CPU smoke run of the script, "
                 "or --full-cpu-check to build the full-size model on the CPU")
    args.model_config, args.shape = (TINY, TINY_SHAPE) if args.tiny else (SD35_MEDIUM, FULL_SHAPE)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 2, 4, 8, 16, 32])
    args.learner_batches = args.learner_batches or args.batches
    args.ablation_batches = args.ablation_batches or ([1, 2] if args.tiny else [1, 8, 32])
    args.steps = args.steps or (2 if args.tiny else 10)
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.tiny:  # a smoke run on a CPU shared with other work: one thread spins less
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    print(f"device {describe_machine(device)}; {'tiny' if args.tiny else 'SD3.5-medium'} config, {args.dtype}, "
          f"{args.steps} steps, shift {args.shift}, CFG {args.cfg}", flush=True)
    full = count_flops(SD35_MEDIUM, FULL_SHAPE, args.lora_rank, args.lora_targets)
    flops = full if not args.tiny else count_flops(TINY, TINY_SHAPE, args.lora_rank, args.lora_targets)
    print(f"counted: {flops['params'] / 1e9:.4f} B parameters, forward {flops['fwd'] / 1e9:.3f} GFLOP per sample, "
          f"LoRA forward + backward {flops['train'] / 1e9:.3f} GFLOP per sample", flush=True)
    ceiling = matmul_ceiling(device, dtype)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if device.type == "cuda":
        print(f"8192³ matmul: {ceiling:.0f} TFLOP/s; datasheet dense bf16 peak {fmt(peak, '.0f')} TFLOP/s", flush=True)

    t = time.perf_counter()
    tr = build_transformer(args.model_config, device, dtype)
    print(f"transformer built in {time.perf_counter() - t:.1f} s: "
          f"{sum(p.numel() for p in tr.parameters()) / 1e9:.4f} B parameters", flush=True)
    bench = Bench(args, device, dtype, flops)
    if "sampler" in args.parts or "diffusers" in args.parts:
        bench.sampler(tr, args.batches)
    if "ablation" in args.parts:
        bench.ablations(tr, args.ablation_batches)
    if "learner" in args.parts:
        bench.learner(tr, args.learner_batches)
    minutes = (time.perf_counter() - t_start) / 60

    rows = bench.rows
    context = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "tiny": args.tiny, "dtype": args.dtype, "steps": args.steps, "cfg": args.cfg}
    if args.results:
        kept = []
        if args.results.is_file():
            saved = json.loads(args.results.read_text())
            if saved.get("context") == context:
                new = {(r["part"], r["variant"], r["batch"]) for r in rows}
                kept = [r for r in saved["rows"] if (r["part"], r["variant"], r["batch"]) not in new]
            else:
                print(f"{args.results} holds rows of another setting ({saved.get('context')}); replacing them")
        rows = kept + rows
        args.results.write_text(json.dumps({"context": context, "rows": rows}, indent=1) + "\n")
    text = docs_text(args, rows, device, full, minutes, ceiling)
    print("\n" + text)
    if args.write_docs:
        write_section(BEGIN, END, HEADING, text)
        print(f"\nwrote {BEGIN} … {END} in docs/performance.md")


if __name__ == "__main__":
    main()

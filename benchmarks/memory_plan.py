"""Learner memory plan for SD3.5-medium: bytes per learner rank, estimated without a GPU.

Everything is counted on the meta device (shapes, no memory): the transformer's parameters by
name and shape (and checked against an analytic sum over its config), the LoRA adapter's
parameters (r·(in + out) per targeted Linear, peft's name matching; checked against peft), and
the activations that autograd saves for backward, counted with ``saved_tensors_hooks`` during one
bf16 forward of the project's own ``SD3Velocity`` (LoRA added by ``samplers.policy.add_lora``),
attention counted as a fused kernel saves it (q, k, v, output, log-sum-exp: what SDPA's flash /
cuDNN / memory-efficient paths keep on a GPU, not the math path's attention matrices), at 512 px: latents 16×64×64 → 1024 image tokens, plus 77 + 256 = 333 text tokens.

    .venv/bin/python benchmarks/memory_plan.py                      # print the plan
    .venv/bin/python benchmarks/memory_plan.py --write-docs         # and write it to docs/performance.md
    .venv/bin/python benchmarks/memory_plan.py --measured OUT/gpu_check.json  # measured peaks beside it

Layouts (per learner rank; N ranks; b = micro-batch):

- LoRA r32 (the project's default targets, services/config.py LoRAConfig): base weights bf16
  (frozen), adapter fp32, its gradients fp32, AdamW's two moments fp32, π_old a second adapter
  (adapter bytes), the reference free (the adapter switched off);
- full fine-tune: the trained weights bf16, gradients bf16 (the parameters' dtype), AdamW's two
  moments fp32 (8 bytes per parameter; torch's AdamW on bf16 weights would keep them in bf16,
  half that), π_old and the frozen reference each a bf16 copy of the weights;
- DDP replicates all of it on every rank (plus its gradient buckets, one more gradient copy);
  FSDP shards weights, gradients, optimizer state and frozen copies 1/N (plus the unsharded
  weights of two blocks while it gathers them). The positional-embedding table (a buffer) and
  the activations are per rank in both;
- activations per sample: the tensors autograd saves in the forward (counted, see above); with
  per-block gradient checkpointing, each block's inputs plus, during backward, one block's
  saved tensors recomputed. A transient of one block's saved bytes is added to both (the
  gradients of the block being back-propagated).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, also where fmrl is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from samplers.sd3 import SD35_MEDIUM  # noqa: E402

BEGIN, END = "<!-- memory-plan:begin -->", "<!-- memory-plan:end -->"
HEADING = "## Learner memory plan (SD3.5-medium)"

GB = 1e9
GPU_BYTES = 80e9  # "one 80 GB GPU"
HEADROOM = 0.30  # the goal: at least 30 % of it left free
LORA_RANK = 32
RESOLUTION = 512
TEXT_TOKENS = 77 + 256  # the two CLIPs' 77 + T5's max_sequence_length
MICRO_BATCHES = (1, 2, 4, 8)
RANKS = (1, 2, 8)
Mode = Literal["lora", "full"]
Strategy = Literal["ddp", "fsdp"]
SHARDED = ("base", "trained", "grads", "adamw", "rollout", "reference")  # what FSDP divides by N


def default_lora_targets() -> list[str]:
    """The project's default LoRA target modules (services/config.py)."""
    from services.config import LoRAConfig

    return list(LoRAConfig().target_modules)


# ---- parameters -----------------------------------------------------------------------------

def _lin(i: int, o: int) -> int:
    return i * o + o


def analytic_params(cfg: dict[str, Any]) -> dict[str, int]:
    """The SD3 transformer's parameter count by part, from its config alone (diffusers 0.42's
    ``SD3Transformer2DModel``): patch embedding, time and pooled-text embedders, context
    embedder, the joint blocks (adaLN modulations, attention over both streams, RMS q/k norms,
    SD3.5's second image attention in the dual-attention blocks, the two MLPs; the last block
    is context-pre-only: no context output projection nor context MLP), output norm and projection."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    d, p, layers = cfg["attention_head_dim"], cfg["patch_size"], cfg["num_layers"]
    dual = set(cfg.get("dual_attention_layers") or ())
    qk = cfg.get("qk_norm") is not None
    out: dict[str, int] = {
        "patch embedding": cfg["in_channels"] * p * p * h + h,
        "time + pooled-text embedders": _lin(256, h) + _lin(h, h) + _lin(cfg["pooled_projection_dim"], h) + _lin(h, h),
        "context embedder": _lin(cfg["joint_attention_dim"], cfg["caption_projection_dim"]),
    }
    blocks = 0
    for i in range(layers):
        last = i == layers - 1
        blocks += _lin(h, (9 if i in dual else 6) * h)  # adaLN-Zero (X: + a second attention's shift/scale/gate)
        blocks += _lin(h, 2 * h) if last else _lin(h, 6 * h)  # context adaLN (continuous in the last block)
        blocks += 3 * _lin(h, h) + _lin(h, h)  # image q, k, v, out
        blocks += 3 * _lin(h, h) + (0 if last else _lin(h, h))  # context q, k, v (+ out)
        blocks += 4 * d if qk else 0  # RMSNorm weights of q, k and the context's q, k
        if i in dual:
            blocks += 4 * _lin(h, h) + (2 * d if qk else 0)
        mlp = _lin(h, 4 * h) + _lin(4 * h, h)
        blocks += mlp + (0 if last else mlp)
    out["joint blocks"] = blocks
    out["output norm + projection"] = _lin(h, 2 * h) + _lin(h, p * p * cfg["out_channels"])
    return out


def meta_transformer(cfg: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # its note on casting a model with .to(dtype) concerns loading, not counting

    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    return model.to(dtype)


def peft_targets(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target modules: the module's name is one, or ends in '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params(model: nn.Module, rank: int, targets: Iterable[str]) -> int:
    """Parameters of a LoRA adapter of ``rank`` on ``targets``: r·(in + out) per targeted Linear
    (A is r × in, B is out × r, no biases)."""
    targets = list(targets)
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and peft_targets(n, targets))


def peft_lora_params(cfg: dict[str, Any], rank: int, targets: Iterable[str]) -> int:
    """The same, counted by adding the adapter with peft (through ``samplers.policy.add_lora``) on the meta device."""
    from samplers.policy import SD3Velocity, add_lora

    velocity = SD3Velocity(meta_transformer(cfg).requires_grad_(False))
    add_lora(velocity, rank, rank, list(targets))
    return sum(p.numel() for p in velocity.parameters() if p.requires_grad)


# ---- activations ----------------------------------------------------------------------------

class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, cuDNN, memory-efficient: what SDPA runs on a CUDA GPU)
    saves for backward: q, k, v, the output and a float32 log-sum-exp per query. On the meta device
    SDPA takes the math path, which saves the full attention matrices: a GPU never holds those."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001  # never run: counting only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,  # noqa: ANN401
                dropout_p: float = 0.0, is_causal: bool = False, **_: Any) -> torch.Tensor:  # noqa: ANN401
    if attn_mask is not None or dropout_p or is_causal:
        raise NotImplementedError("the count models unmasked, dropout-free attention (SD3's)")
    return _FusedAttention.apply(query, key, value)


def saved_activations(cfg: dict[str, Any], mode: Mode, rank: int, targets: list[str], side: int,
                      text_tokens: int) -> dict[str, Any]:
    """Bytes autograd saves for backward in one bf16 forward at batch 1, by block, counted on the
    meta device: every saved tensor that is not a parameter (or a view of one), each storage
    once (a view counts as its base). ``mode`` lora: base frozen, adapter fp32 (frozen Linears
    save no input, the adapter saves its fp32 copy of it); full: every weight trains."""
    from torch.autograd.graph import saved_tensors_hooks

    from samplers.policy import SD3Velocity, add_lora
    from samplers.text import PromptEmbeddings

    tr = meta_transformer(cfg)
    velocity = SD3Velocity(tr)
    if mode == "lora":
        tr.requires_grad_(False)
        add_lora(velocity, rank, rank, targets)
    else:
        tr.requires_grad_(True)
    params = {id(p) for p in velocity.parameters()} | {id(b) for b in velocity.buffers()}
    where = ["outside blocks"]
    for i, block in enumerate(tr.transformer_blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: where.__setitem__(0, f"block {i}"))
        block.register_forward_hook(lambda _m, _a, _o: where.__setitem__(0, "outside blocks"))
    seen: dict[int, tuple[str, int]] = {}
    keep: list[torch.Tensor] = []  # saved tensors stay alive, so their ids stay unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            keep.append(base)
            if id(base) not in seen:
                seen[id(base)] = (where[0], base.numel() * base.element_size())
        return t

    c = cfg["in_channels"]
    x = torch.randn(1, c, side, side, device="meta")
    cond = PromptEmbeddings(torch.randn(1, text_tokens, cfg["joint_attention_dim"], device="meta"),
                            torch.randn(1, cfg["pooled_projection_dim"], device="meta"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa  # diffusers looks it up per call
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            out = velocity(x.requires_grad_(False), torch.full((1,), 0.5, device="meta"), cond)
            (out.float() - x).pow(2).mean()  # the flow-matching MSE the objectives start from
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    by_block: dict[str, int] = defaultdict(int)
    for label, nbytes in seen.values():
        by_block[label] += nbytes
    blocks = [v for k, v in by_block.items() if k.startswith("block ")]
    h = tr.inner_dim
    image_tokens = (side // cfg["patch_size"]) ** 2
    # what per-block checkpointing keeps of a block: its inputs, both streams and temb, bf16
    block_inputs = 2 * ((image_tokens + text_tokens) * h + h)
    return {"total": sum(by_block.values()), "outside": by_block.get("outside blocks", 0),
            "max_block": max(blocks), "blocks": sum(blocks), "block_inputs": block_inputs * len(blocks),
            "per_token_width": sum(blocks) / len(blocks) / ((image_tokens + text_tokens) * h),
            "image_tokens": image_tokens, "text_tokens": text_tokens, "width": h}


def activation_bytes(act: dict[str, Any], batch: int, checkpointing: bool) -> int:
    """Per-rank activation bytes at micro-batch ``batch`` (see the module docstring)."""
    kept = act["block_inputs"] + act["outside"] if checkpointing else act["total"]
    return batch * (kept + act["max_block"] + (act["max_block"] if checkpointing else 0))


# ---- state ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    params: int  # the transformer's parameters
    buffers: int  # its buffers' elements (the positional-embedding table)
    adapter: int  # LoRA parameters at the planned rank
    block_params: int  # the largest block's parameters (FSDP gathers them unsharded)


def state_bytes(s: Sizes, mode: Mode, strategy: Strategy, ranks: int) -> dict[str, float]:
    """Bytes per rank of everything but activations; FSDP divides the ``SHARDED`` parts by N."""
    bf16, fp32 = 2, 4
    if mode == "lora":
        parts = {"base": bf16 * s.params, "trained": fp32 * s.adapter, "grads": fp32 * s.adapter,
                 "adamw": 2 * fp32 * s.adapter, "rollout": fp32 * s.adapter, "reference": 0}
    else:
        parts = {"base": 0, "trained": bf16 * s.params, "grads": bf16 * s.params, "adamw": 2 * fp32 * s.params,
                 "rollout": bf16 * s.params, "reference": bf16 * s.params}
    out: dict[str, float] = {k: float(v) for k, v in parts.items()}
    if strategy == "fsdp":
        out = {k: v / ranks for k, v in out.items()}
    out["buffers"] = float(bf16 * s.buffers)
    if ranks > 1:
        out["comm"] = float(parts["grads"] if strategy == "ddp" else 2 * bf16 * s.block_params)
    else:
        out["comm"] = 0.0
    return out


def sizes(cfg: dict[str, Any], rank: int, targets: list[str]) -> Sizes:
    tr = meta_transformer(cfg)
    blocks = [sum(p.numel() for p in b.parameters()) for b in tr.transformer_blocks]
    return Sizes(sum(p.numel() for p in tr.parameters()), sum(b.numel() for b in tr.buffers()),
                 lora_params(tr, rank, targets), max(blocks))


# ---- the plan and its text ------------------------------------------------------------------

def gb(x: float) -> str:
    return f"{x / GB:.2f}"


def measured_peaks(path: Path) -> dict[tuple[int, bool], float]:
    """(micro-batch, checkpointing) → measured peak bytes of the LoRA learner step, from
    gpu_check.json (its "rollout" results) or gpu_rollout.py's --results file."""
    data = json.loads(path.read_text())
    rows = (data.get("rollout") or data).get("rows", [])
    out: dict[tuple[int, bool], float] = {}
    for r in rows:
        if r.get("part") == "learner" and r.get("peak_gib") is not None:
            out[(int(r["batch"]), "checkpointing" in r.get("variant", ""))] = r["peak_gib"] * 2**30
    return out


def plan_text(cfg: dict[str, Any], measured: Path | None = None) -> tuple[str, dict[str, Any]]:
    targets = default_lora_targets()
    s = sizes(cfg, LORA_RANK, targets)
    analytic = analytic_params(cfg)
    peft_count = peft_lora_params(cfg, LORA_RANK, targets)
    side = RESOLUTION // 8
    acts = {m: saved_activations(cfg, m, LORA_RANK, targets, side, TEXT_TOKENS) for m in ("lora", "full")}
    lines = [
        f"Printed by `.venv/bin/python benchmarks/memory_plan.py --write-docs` (no GPU: everything is counted on "
        f"the meta device; diffusers' `SD3Transformer2DModel` with `SD35_MEDIUM`, samplers/sd3.py). "
        f"Units: GB = 10⁹ bytes. 512 px: latents 16×{side}×{side} → {acts['lora']['image_tokens']} image tokens "
        f"+ {TEXT_TOKENS} text tokens, width {acts['lora']['width']}, bf16.",
        "",
        f"**Parameters.** {s.params:,} in the transformer (counted on the meta device; the analytic sum over "
        f"its config is {sum(analytic.values()):,}: " + ", ".join(f"{k} {v:,}" for k, v in analytic.items())
        + f") plus a positional-embedding buffer of {s.buffers:,} elements. LoRA r{LORA_RANK} on "
        f"{targets} (the project's default): {s.adapter:,} parameters = r·(in + out) over "
        f"{s.adapter // (LORA_RANK * 2 * acts['lora']['width'])} targeted {acts['lora']['width']}×"
        f"{acts['lora']['width']} Linears (peft counts {peft_count:,}).",
        "",
        "**Activations per sample** (saved tensors counted by `saved_tensors_hooks` in one forward, each storage "
        "once; see the script's docstring):",
        "",
        "| mode | saved, no checkpointing (GB) | per block, mean (bytes per token per width) | largest block (GB) | "
        "with per-block checkpointing: block inputs + outside + one block (GB) |",
        "|---|---|---|---|---|",
    ]
    for m, a in acts.items():
        ck = a["block_inputs"] + a["outside"] + a["max_block"]
        lines.append(f"| {m} | {gb(a['total'])} | {a['per_token_width']:.1f} | {gb(a['max_block'])} | {gb(ck)} |")
    lines += [
        "",
        "Formula: A(b) = b·(Σ_blocks S_block + S_outside) + b·max S_block without checkpointing, and "
        "A_ckpt(b) = b·(L·2·((N_img + N_txt)·h + h) + S_outside) + 2·b·max S_block with it (S = saved bytes counted "
        "above, L = 24 blocks, h = 1536, N_img = 1024, N_txt = 333; the extra max S_block is the gradients of the "
        "block being back-propagated, and with checkpointing also its recomputed activations).",
        "",
        "**State per learner rank** (GB; activations not included; FSDP shards every column but buffers and "
        "communication; comm = DDP's gradient buckets, or FSDP's two gathered blocks):",
        "",
        "| mode | strategy | N | base weights | trained weights | gradients | AdamW (2 fp32 moments) | π_old | "
        "reference | buffers | comm | total |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: list[dict[str, Any]] = []
    for mode in ("lora", "full"):
        for strategy in ("ddp", "fsdp"):
            for n in RANKS:
                st = state_bytes(s, mode, strategy, n)  # type: ignore[arg-type]
                total = sum(st.values())
                rows.append({"mode": mode, "strategy": strategy, "ranks": n, **st, "total": total})
                lines.append(f"| {mode} | {strategy.upper()} | {n} | " + " | ".join(
                    gb(st[k]) for k in (*SHARDED, "buffers", "comm")) + f" | {gb(total)} |")
    budget = (1 - HEADROOM) * GPU_BYTES
    lines += [
        "",
        "LoRA gradients and AdamW moments are fp32 (the adapter trains in fp32 on the bf16 base, "
        "samplers.policy.add_lora); full fine-tuning's gradients are bf16, its moments fp32. π_old for LoRA is the "
        "second adapter the learner keeps (samplers.policy.RolloutAdapter); keeping π_old as a deep copy of the policy would cost "
        f"another {gb(2 * s.params + 4 * s.adapter)} GB (the bf16 base again).",
        "",
        f"**Goal: SD3.5-M LoRA r{LORA_RANK} at {RESOLUTION} px on one 80 GB GPU with ≥ {HEADROOM:.0%} headroom**, "
        f"i.e. a learner rank's peak ≤ {gb(budget)} GB (N = 1, DDP = FSDP):",
        "",
        "| micro-batch | checkpointing | state (GB) | activations (GB) | total (GB) | headroom of 80 GB | meets the goal |"
        + (" measured peak, learner step (GB) | estimate of that step (GB) |" if measured else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if measured else ""),
    ]
    peaks = measured_peaks(measured) if measured else {}
    lora1 = state_bytes(s, "lora", "ddp", 1)
    state = sum(lora1.values())
    step_state = state - lora1["rollout"]  # gpu_rollout's learner step has no π_old
    goal: list[dict[str, Any]] = []
    for b in MICRO_BATCHES:
        for ck in (False, True):
            a = activation_bytes(acts["lora"], b, ck)
            total = state + a
            ok = total <= budget
            goal.append({"micro_batch": b, "checkpointing": ck, "state": state, "activations": a, "total": total,
                         "meets": ok})
            row = (f"| {b} | {'yes' if ck else 'no'} | {gb(state)} | {gb(a)} | {gb(total)} | "
                   f"{1 - total / GPU_BYTES:.0%} | {'yes' if ok else 'no'} |")
            if measured:
                peak = peaks.get((b, ck))
                row += f" {gb(peak) if peak else '—'} | {gb(step_state + a)} |"
            lines.append(row)
    if measured:
        lines += ["", f"Measured: `{measured}` (benchmarks/gpu_check.sh: gpu_rollout.py's LoRA learner step, "
                  "torch.cuda.max_memory_allocated; no π_old there, so its estimate leaves π_old out)."]
        e2e = json.loads(measured.read_text()).get("e2e") or {}
        if e2e.get("learner_rank_peak_bytes") is not None:
            b = int(e2e["micro_batch"])
            est = state + activation_bytes(acts["lora"], b, False)
            lines += ["", f"End to end (benchmarks/gpu_e2e.py, micro-batch {b}): the learner's update peaked at "
                      f"{gb(e2e['learner_rank_peak_bytes'])} GB above what the sampler holds; the plan says "
                      f"{gb(est)} GB for this rank with π_old as a second adapter, "
                      f"{gb(est + 2 * s.params + 2 * s.buffers)} GB with π_old as a deep copy of the policy."]
    data = {"params": s.params, "buffers": s.buffers, "adapter": s.adapter, "analytic": analytic,
            "peft_adapter": peft_count, "activations": acts, "state": rows, "goal": goal, "targets": targets}
    return "\n".join(lines), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", type=Path, help="gpu_check.json (or gpu_rollout.py --results): measured peaks beside")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--write-docs", action="store_true", help="write the plan into docs/performance.md")
    args = ap.parse_args()
    text, data = plan_text(SD35_MEDIUM, args.measured)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=float) + "\n")
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        write_section(BEGIN, END, HEADING, text)
        print(f"\nwrote {BEGIN} … {END} in docs/performance.md")


if __name__ == "__main__":
    main()

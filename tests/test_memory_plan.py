"""benchmarks/memory_plan.py: its counts agree with the model and with peft, and FSDP's
per-rank bytes are DDP's divided by N for what it shards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_plan as mp  # noqa: E402

from samplers.sd3 import SD35_MEDIUM  # noqa: E402

# SD3-medium (not 3.5): no dual-attention blocks, no q/k norms; and a toy config
SD3_MEDIUM = {**SD35_MEDIUM, "dual_attention_layers": (), "qk_norm": None}
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 3,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 24,
        "caption_projection_dim": 16, "pooled_projection_dim": 12, "pos_embed_max_size": 8,
        "dual_attention_layers": (0,), "qk_norm": "rms_norm"}


@pytest.mark.parametrize("cfg", [SD35_MEDIUM, SD3_MEDIUM, TINY], ids=["sd3.5-medium", "sd3-medium", "tiny"])
def test_meta_count_is_the_analytic_sum(cfg):
    model = mp.meta_transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == sum(mp.analytic_params(cfg).values())


def test_sd35_medium_sizes():
    s = mp.sizes(SD35_MEDIUM, 32, ["to_q", "to_k", "to_v", "to_out.0"])
    assert s.params == 2_243_171_520
    assert s.buffers == 384 * 384 * 1536  # the positional-embedding table
    # 24 blocks' attention + 13 dual blocks' second attention, 4 targeted 1536×1536 Linears each
    assert s.adapter == 32 * (1536 + 1536) * 4 * (24 + 13) == 14_548_992


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"],
                                     ["to_q", "add_k_proj", "to_add_out", "ff.net.2", "proj_out"]])
def test_lora_formula_matches_peft(targets):
    model = mp.meta_transformer(TINY)
    assert mp.lora_params(model, 4, targets) == mp.peft_lora_params(TINY, 4, targets) > 0


def test_default_targets_are_the_configs():
    assert mp.default_lora_targets() == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_fsdp_shards_what_ddp_replicates(mode, ranks):
    s = mp.Sizes(params=1000, buffers=10, adapter=40, block_params=100)
    ddp, fsdp = mp.state_bytes(s, mode, "ddp", ranks), mp.state_bytes(s, mode, "fsdp", ranks)
    for part in mp.SHARDED:
        assert fsdp[part] == pytest.approx(ddp[part] / ranks)
    assert fsdp["buffers"] == ddp["buffers"]  # replicated in both
    assert ddp == mp.state_bytes(s, mode, "ddp", 1) | {"comm": ddp["comm"]}  # DDP: N changes only the buckets
    if mode == "lora":  # fp32 adapter, its gradients, two moments, π_old = a second adapter; reference free
        assert [ddp[k] for k in mp.SHARDED] == [2000, 160, 160, 320, 160, 0]
    else:  # bf16 weights and gradients, fp32 moments, π_old and reference bf16 copies
        assert [ddp[k] for k in mp.SHARDED] == [0, 2000, 2000, 8000, 2000, 2000]


def test_activations_checkpointing_keeps_less():
    act = mp.saved_activations(TINY, "lora", 4, ["to_q", "to_k", "to_v", "to_out.0"], side=8, text_tokens=5)
    assert act["total"] == act["blocks"] + act["outside"] and act["max_block"] > 0
    for b in (1, 2, 4):
        full, ckpt = mp.activation_bytes(act, b, False), mp.activation_bytes(act, b, True)
        assert full == b * mp.activation_bytes(act, 1, False) and ckpt == b * mp.activation_bytes(act, 1, True)

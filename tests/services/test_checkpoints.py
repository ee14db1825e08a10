"""Checkpoints under faults and bad input: damaged or altered files, links planted in a run,
torn metrics, refused resume overrides, a run that fails before its first iteration.

Most tests build a real run directory without Ray (the learner's own save, the driver's
checkpoint writer) and go through the loaders and the command line in this process; the
last ones train through real Ray actors."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import ray

from learner.learner import Learner
from samplers.policy import load_velocity
from services.checkpoints import (
    check_resume_overrides,
    latest_checkpoint,
    link_final_checkpoint,
    metrics_upto,
    write_checkpoint,
)
from services.cli import main
from services.config import dump_config
from services.driver import train
from services.evaluation import evaluation_of
from services.world import resolve_checkpoint
from tests.helpers import table_encode
from tests.services.conftest import short_config

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


TOTALS = {"dropped_stale": 0, "redone_lost": 0, "lost_reward": 0, "resyncs": 0, "broadcast_failures": 0}


def make_run(out, policy, name="run"):
    """A run directory as `fmrl train` leaves it after 2 of 4 iterations (checkpoint at 2, the
    final checkpoint/ linked from it, as a finished run would have), from real parts."""
    cfg = short_config(out, policy, name=name, iterations=4, **{"run.checkpoint_every": 2})
    run = out / name
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    learner = Learner(load_velocity(policy), table_encode, cfg.learner_settings())
    state = {"iteration": 2, "version": 0, "elapsed_s": 1.5, "totals": TOTALS}
    ckpt = write_checkpoint(run, 2, state, learner.save, keep=2)
    link_final_checkpoint(ckpt, run / "checkpoint")
    prompts = list(dict.fromkeys(cfg.rollout.prompts))
    images = np.zeros((len(prompts), 2, 8, 8, 1), np.uint8)
    images[:, 1] = 255
    evaluation_of(0, prompts, images, np.full(2 * len(prompts), 0.5), None).save(run / "eval_before.npz")
    rows = [{"kind": "eval", "when": "before", "version": 0, "reward": 0.5}] + \
        [{"kind": "train", "iteration": i, "loss": 0.1 * i} for i in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def flip_tensor_byte(path):
    """Flip one bit in the tensor data of a safetensors file (past its 8-byte length and header)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    i = 8 + header + (len(data) - 8 - header) // 2
    data[i] ^= 0x01
    path.write_bytes(data)  # in place: the final checkpoint/ hard-links the same file


def one_error_line(capsys):
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("fmrl: error: "), err
    return err[0]


# ---- 1. integrity ---------------------------------------------------------------------------
def test_a_flipped_byte_is_refused_by_resume_sample_and_eval(tmp_path, small_policy, capsys):
    run = make_run(tmp_path, small_policy)
    ckpt = latest_checkpoint(run)
    standalone = tmp_path / "copy.safetensors"
    shutil.copy(ckpt / "policy.safetensors", standalone)
    flip_tensor_byte(ckpt / "policy.safetensors")
    flip_tensor_byte(standalone)
    learner = Learner(load_velocity(small_policy), table_encode, short_config(tmp_path, small_policy).learner_settings())

    with pytest.raises(ValueError, match=f"{ckpt / 'policy.safetensors'} is corrupt"):
        learner.load(ckpt)  # what `fmrl train --resume` does in the learner actor
    assert learner.step == 0
    with pytest.raises(ValueError, match=f"{standalone} is corrupt"):
        load_velocity(standalone)
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(standalone), "--prompt", "a handwritten one", "-n", "2",
                 "--out", str(out)]) == 1
    assert f"{standalone} is corrupt" in one_error_line(capsys) and not out.exists()
    # `fmrl eval RUN` reads the final checkpoint/, whose files are the last checkpoint's (linked)
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev")]) == 1
    assert f"{run / 'checkpoint' / 'policy.safetensors'} is corrupt" in one_error_line(capsys)
    assert not (tmp_path / "ev").exists()


def test_a_truncated_checkpoint_file_is_named_and_resume_changes_nothing(tmp_path, small_policy, capsys):
    run = make_run(tmp_path, small_policy)
    opt = latest_checkpoint(run) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-100])
    config = (run / "config.yaml").read_bytes()
    learner = Learner(load_velocity(small_policy), table_encode, short_config(tmp_path, small_policy).learner_settings())
    with pytest.raises(ValueError, match=f"{opt} is not a readable safetensors checkpoint"):
        learner.load(opt.parent)
    assert main(["train", "--resume", str(run), "--set", "run.iterations=6"]) == 1
    assert f"{opt} is not a readable safetensors checkpoint" in one_error_line(capsys)
    assert (run / "config.yaml").read_bytes() == config


# ---- 2. links and names ----------------------------------------------------------------------
def test_latest_may_name_only_a_checkpoint_of_its_own_run(tmp_path, small_policy):
    run = make_run(tmp_path, small_policy, "run")
    other = make_run(tmp_path, small_policy, "other")
    pointer = run / "checkpoints" / "latest"
    pointer.write_text("../../other/checkpoints/iter-0000002\n")
    with pytest.raises(ValueError, match="not a checkpoint of this run"):
        latest_checkpoint(run)
    pointer.unlink()
    pointer.symlink_to(other / "checkpoints" / "latest")
    with pytest.raises(ValueError, match="is not a plain file"):
        latest_checkpoint(run)
    pointer.unlink()
    pointer.write_text("iter-0000002\n")
    shutil.rmtree(run / "checkpoints" / "iter-0000002")
    (run / "checkpoints" / "iter-0000002").symlink_to(other / "checkpoints" / "iter-0000002")
    with pytest.raises(FileNotFoundError, match="not a directory of this run"):
        latest_checkpoint(run)


def test_links_planted_in_a_run_are_never_written_through(tmp_path, small_policy, capsys):
    run = make_run(tmp_path, small_policy)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    root = run / "checkpoints"
    (root / "latest.tmp").symlink_to(victim)
    (root / ".iter-0000004.tmp").symlink_to(tmp_path, target_is_directory=True)
    learner = Learner(load_velocity(small_policy), table_encode, short_config(tmp_path, small_policy).learner_settings())
    state = {"iteration": 4, "version": 0, "elapsed_s": 3.0, "totals": TOTALS}
    assert write_checkpoint(run, 4, state, learner.save, keep=2) == root / "iter-0000004"
    assert victim.read_text() == "precious\n" and (tmp_path / "victim.txt").is_file()
    assert latest_checkpoint(run).name == "iter-0000004" and not (root / "latest").is_symlink()
    # a run whose config.yaml is a link out of it is refused before the file is read or written
    (run / "config.yaml").rename(tmp_path / "outside.yaml")
    (run / "config.yaml").symlink_to(tmp_path / "outside.yaml")
    outside = (tmp_path / "outside.yaml").read_bytes()
    assert main(["train", "--resume", str(run)]) == 1
    assert f"{run / 'config.yaml'} is a link to" in one_error_line(capsys)
    assert (tmp_path / "outside.yaml").read_bytes() == outside
    # `fmrl sample/eval RUN` refuse a final checkpoint/ file that is a link out of the run
    (run / "checkpoint" / "policy.safetensors").unlink()
    (run / "checkpoint" / "policy.safetensors").symlink_to(small_policy)
    with pytest.raises(ValueError, match="outside .*; refusing it"):
        resolve_checkpoint(run)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, small_policy):
    """SIGKILL in the middle of a checkpoint (after the learner wrote its files, before the
    rename): the previous checkpoint stays latest and loads; the next save clears the leftovers."""
    run = make_run(tmp_path, small_policy)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from learner.learner import Learner
        from samplers.policy import load_velocity
        from services.checkpoints import write_checkpoint
        from tests.helpers import table_encode
        from tests.services.conftest import short_config

        cfg = short_config(Path({str(tmp_path)!r}), Path({str(small_policy)!r}))
        learner = Learner(load_velocity({str(small_policy)!r}), table_encode, cfg.learner_settings())

        def save_and_die(d):
            learner.save(d)
            os.kill(os.getpid(), signal.SIGKILL)

        write_checkpoint(Path({str(run)!r}), 4, {{"iteration": 4}}, save_and_die, keep=2)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    root = run / "checkpoints"
    assert [p.name for p in root.glob(".iter-0000004.*")], "the killed save left its temporary directory"
    assert latest_checkpoint(run).name == "iter-0000002"
    learner = Learner(load_velocity(small_policy), table_encode, short_config(tmp_path, small_policy).learner_settings())
    learner.load(latest_checkpoint(run))
    state = {"iteration": 4, "version": 0, "elapsed_s": 3.0, "totals": TOTALS}
    write_checkpoint(run, 4, state, learner.save, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter-0000002", "iter-0000004", "latest"]


# ---- 3. torn and damaged run files -------------------------------------------------------------
def test_a_torn_metrics_tail_is_dropped_and_said(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "eval", "when": "before", "reward": 0.5}, {"kind": "train", "iteration": 0},
            {"kind": "train", "iteration": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "itera')
    assert [json.loads(x) for x in metrics_upto(path, 2)] == rows
    assert f"{path}: dropped its partial last line (line 4" in capsys.readouterr().out
    path.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=f"{path} line 2 is not a metrics record"):
        metrics_upto(path, 2)


@pytest.mark.parametrize("damage,message", [
    pytest.param(lambda run: (latest_checkpoint(run) / "driver.json").write_text('{"iteration": 2, "vers'),
                 "checkpoints/iter-0000002/driver.json is not a valid checkpoint record (JSONDecodeError",
                 id="driver-json-torn"),
    pytest.param(lambda run: (latest_checkpoint(run) / "driver.json").write_text('{"iteration": 3}'),
                 "checkpoints/iter-0000002/driver.json is not a valid checkpoint record (KeyError",
                 id="driver-json-keys"),
    pytest.param(lambda run: (run / "eval_before.npz").unlink(), "eval_before.npz missing", id="eval-before-missing"),
    pytest.param(lambda run: (run / "eval_before.npz").write_bytes(b"PK\x03\x04 torn"), "eval_before.npz is damaged",
                 id="eval-before-damaged"),
    pytest.param(lambda run: (run / "metrics.jsonl").unlink(), "metrics.jsonl missing", id="metrics-missing"),
])
def test_damaged_run_files_are_named_and_resume_changes_nothing(tmp_path, small_policy, capsys, damage, message):
    run = make_run(tmp_path, small_policy)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run)]) == 1
    line = one_error_line(capsys)
    assert message in line and str(run) in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ---- 4. overrides on resume --------------------------------------------------------------------
def test_resume_overrides_the_checkpoint_would_ignore_are_refused(tmp_path, small_policy):
    saved = short_config(tmp_path, small_policy)
    for ok in ({"run.iterations": 9, "learner.lr": 5e-4, "metrics.port": 9401, "resources.sampler_cpus": 0.5,
                "run.checkpoint_every": 1, "pipeline.weight_sync": "torch_distributed"},):
        check_resume_overrides(saved, short_config(tmp_path, small_policy, **ok))
    # leaving AC-Flow also leaves its preset (learner.rollout_update: ema): both are named
    changed = {"algorithm.name": "algorithm.name, learner.rollout_update"}
    for key, value in (("run.seed", 3), ("learner.weight_decay", 0.1), ("learner.warmup_steps", 2),
                       ("algorithm.name", "orw_cfm_w2"), ("resources.num_samplers", 2),
                       ("eval.samples_per_prompt", 4), ("pipeline.max_policy_lag", 1)):
        named = re.escape(changed.get(key, key))
        with pytest.raises(ValueError, match=rf"--resume cannot change {named}: .* may change only run.iterations"):
            check_resume_overrides(saved, short_config(tmp_path, small_policy, **{key: value}))


def test_a_refused_override_leaves_the_run_as_it_was(tmp_path, small_policy, capsys):
    run = make_run(tmp_path, small_policy)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run), "--set", "algorithm.name=orw_cfm_w2"]) == 1
    line = one_error_line(capsys)
    assert "--resume cannot change algorithm.name" in line and "learner.lr" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ---- through real Ray actors ---------------------------------------------------------------------
def test_a_run_that_fails_before_its_first_iteration_leaves_no_directory(cluster, tmp_path, small_policy):
    # an unplaceable sampler: start_actors fails (after 1 s) once the run directory exists
    cfg = short_config(tmp_path, small_policy, name="early", **{"resources.sampler_resources": "{inference_gpu: 1}",
                                                                 "resources.placement_timeout_s": 1})
    for _ in range(2):  # the second time is not "run directory already exists"
        with pytest.raises(Exception, match="inference_gpu"):
            train(cfg)
        assert not (tmp_path / "early").exists()


def test_resume_applies_allowed_overrides_after_a_torn_tail_and_refuses_a_corrupt_checkpoint(
        cluster, tmp_path, trained_uri_run, capsys):
    # a finished 3-iteration run (checkpoints every 2, the last at 3), trained once for the
    # session: this test resumes copies of it, in place, as local run directories
    shared = trained_uri_run()
    run = shared.copy_to(tmp_path / "u")
    corrupt = shared.copy_to(tmp_path / "corrupt")
    assert latest_checkpoint(run).name == "iter-0000003"
    capsys.readouterr()

    # a bit flip in the learner's checkpoint is found in the learner actor, named in one line
    flip_tensor_byte(latest_checkpoint(corrupt) / "rollout.safetensors")
    config = (corrupt / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(corrupt), "--set", "run.iterations=6"]) == 1
    assert f"{latest_checkpoint(corrupt) / 'rollout.safetensors'} is corrupt" in one_error_line(capsys)
    assert (corrupt / "config.yaml").read_bytes() == config

    # a crash mid-write left a partial metrics line; the run continues with a new lr
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "iteration": 3, "lo')
    assert main(["train", "--resume", str(run), "--set", "run.iterations=6", "--set", "learner.lr=5e-4"]) == 0
    assert "dropped its partial last line" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == list(range(6))
    assert [r["kind"] + r.get("when", "") for r in rows].count("evalafter") == 1
    # AC-Flow's actor is frozen through its 20-step critic warm-up here (short_config), so the
    # schedule has not stepped: lr = base · min(1, (0 + 1)/10) of the 10-step LambdaLR warm-up,
    # base 1e-3 then 5e-4
    assert [r["lr"] for r in train_rows] == pytest.approx([1e-4] * 3 + [5e-5] * 3)
    assert "lr: 0.0005" in (run / "config.yaml").read_text()
    assert latest_checkpoint(run).name == "iter-0000006"
    assert ray.is_initialized()

"""The run's loggers: each tracker, read back with its own reader, holds metrics.jsonl's values
under metrics.jsonl's names (TensorBoard's EventAccumulator, wandb's offline transaction log,
MLflow's file store), the config, the evaluation grids and the summary; a missing tracker
package is one line naming the extra; start-up phase lines and the warm-up warning; one short
real run with TensorBoard."""

import json
import math
import struct
import sys

import numpy as np
import pytest
import ray

from services.config import ConfigError, TrainConfig, load_config
from services.driver import train, warmup_warning
from services.evaluation import evaluation_of
from services.loggers import (
    ConsoleLogger,
    IterationInfo,
    JsonlLogger,
    Loggers,
    check_trackers,
    eval_grid,
    open_trackers,
)
from tests.services.conftest import short_config

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


PROMPTS = ["a handwritten zero", "a handwritten one"]


def _evaluation(version, reward):
    images = np.zeros((2, 3, 8, 8, 1), np.uint8)
    images[:, 1] = 255
    images[1, 2, 2:6, 3:5] = 128
    scores = np.linspace(reward - 0.1, reward + 0.1, 6)
    return evaluation_of(version, PROMPTS, images, scores, 0.75)


def _rows(iterations):
    """Rows shaped like the driver's: the pipeline's fields, then the learner's statistics."""
    return [{"kind": "train", "iteration": i, "time_s": 0.5 * i + 0.123, "sampler_versions": [i, i], "lag": 0,
             "dropped_stale": 0, "redone_lost": 0, "lost_reward": 0, "version": i + 1, "rollout_version": i,
             "reward_mean": 0.5 + i / 7, "reward_std": 0.1 / (i + 3), "reward/digits_classifier": 0.5 + i / 7,
             "loss": 1 / (i + 3), "lr": 1e-4 * (i + 1), "warmup": float(i < 1), "diversity": 1.9 - i / 11}
            for i in range(iterations)]


def _record(tmp_path, names):
    """A 3-iteration run's outputs through the jsonl logger and the trackers ``names``, as the
    driver sends them; returns the run directory and metrics.jsonl's rows."""
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=rec", "run.iterations=3", "eval.grid_columns=2",
                             "run.progress=false", f"run.loggers={json.dumps(['jsonl', *names])}"])
    run_dir = tmp_path / "rec"
    run_dir.mkdir()
    loggers = Loggers(ConsoleLogger(cfg, printer=lambda _: None))
    loggers.add(JsonlLogger(run_dir, []), *open_trackers(cfg, run_dir))
    try:
        loggers.log_config(cfg, run_dir)
        loggers.log_eval("before", _evaluation(0, 0.4))
        for row in _rows(3):
            loggers.log_iteration(row["iteration"], row, IterationInfo({"update": 0.1}, 0.2))
        loggers.on_checkpoint(run_dir / "checkpoints" / "iter-0000003", 0.01)
        loggers.log_eval("after", _evaluation(3, 0.8))
        loggers.log_summary({"run_dir": str(run_dir), "seconds": 4.5, "before": _evaluation(0, 0.4).headline(),
                             "after": _evaluation(3, 0.8).headline()})
    finally:
        loggers.close()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir, rows


def _expected(rows, iterations=3):
    """(name, step) → value of every number metrics.jsonl holds, as trackers name them."""
    out = {}
    for r in rows:
        if r["kind"] == "train":
            for k, v in r.items():
                if k not in ("kind", "iteration") and isinstance(v, (int, float)):
                    out[(k, r["iteration"])] = float(v)
        else:
            step = {"before": 0, "after": iterations}.get(r["when"], r["iteration"])
            for k, v in r.items():  # the headline, eval rewards, watch statistics and drifts, seconds
                if k not in ("kind", "when", "iteration", "version") and isinstance(v, (int, float)):
                    out[(f"eval/{k}", step)] = float(v)
    return out


def test_tensorboard_event_files_hold_the_jsonl_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, rows = _record(tmp_path, ["tensorboard"])
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    logged = {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    expected = _expected(rows)
    # TensorBoard stores float32: each value is metrics.jsonl's, rounded to float32
    assert {k: v for k, v in logged.items() if not k[0].startswith("summary/")} == \
        {k: float(np.float32(v)) for k, v in expected.items()}
    assert logged[("summary/after/reward", 3)] == pytest.approx(rows[-1]["reward"])
    assert set(ea.Tags()["images"]) == {"eval/before", "eval/after"}
    grid = ea.Images("eval/before")[0]
    assert (grid.height, grid.width) == eval_grid(_evaluation(0, 0.4), 2).shape[:2]
    assert "tensors" in ea.Tags() and any("config" in t for t in ea.Tags()["tensors"])


def _wandb_records(path):
    """The records of a wandb transaction log (.wandb: LevelDB's log format, 32 KiB blocks of
    [crc32c:4][length:2][type:1][data], after a 7-byte header), as protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            records.append(rec)
            part = b""
    return records


def test_wandb_offline_run_holds_the_jsonl_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg, run_dir, rows = _record(tmp_path, ["wandb"])
    [log] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    logged, images, config, summary = {}, set(), {}, {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            step = rec.history.step.num
            for item in rec.history.item:
                if len(item.nested_key) > 1:  # a media value, flattened: eval/before/_type …
                    images.add(item.nested_key[0])
                elif not (key := item.key or item.nested_key[0]).startswith("_"):
                    logged[(key, step)] = json.loads(item.value_json)
        elif kind in ("run", "config"):  # the config given to wandb.init, then any updates
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    assert logged == _expected(rows)  # JSON floats: exact
    assert images == {"eval/before", "eval/after"}
    assert config["run"] == cfg.run.model_dump(mode="json") and config["eval"]["grid_columns"] == 2
    assert summary["summary/after/reward"] == pytest.approx(rows[-1]["reward"])
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] in log.name


def test_mlflow_file_store_holds_the_jsonl_values(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _, run_dir, rows = _record(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "rec"
    logged = {(k, m.step): m.value for k in run.data.metrics for m in client.get_metric_history(run_id, k)}
    assert {k: v for k, v in logged.items() if not k[0].startswith("summary/")} == _expected(rows)
    assert run.data.params["run.iterations"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"config.yaml", "summary.json", "eval/before.png", "eval/after.png"} <= artifacts


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, small_policy, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    with pytest.raises(ConfigError) as err:
        check_trackers(["jsonl", name])
    assert str(err.value) == (f"run.loggers includes {name}, but the {name} package is not installed: "
                              f"pip install 'fmrl[{name}]'")
    # train() refuses before any directory, cluster or actor exists
    cfg = short_config(tmp_path / "runs", small_policy, **{"run.loggers": f"[jsonl,{name}]"})
    started = ray.is_initialized()
    with pytest.raises(ConfigError, match=rf"fmrl\[{name}\]"):
        train(cfg)
    assert not (tmp_path / "runs").exists() and ray.is_initialized() == started


def test_jsonl_is_always_on():
    assert TrainConfig().run.loggers == ["jsonl"]
    assert load_config(None, ["run.loggers=[tensorboard]"]).run.loggers == ["jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match="run.loggers"):
        load_config(None, ["run.loggers=[neptune]"])


def test_train_refuses_what_the_command_line_refuses(tmp_path, small_policy):
    cfg = short_config(tmp_path / "runs", small_policy)
    cfg.resources.num_samplers = 99  # one field at a time passes; the tree does not
    with pytest.raises(ConfigError, match="num_samplers"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_run_that_is_all_critic_warmup_is_warned_about():
    def cfg(iterations, warmup=20, updates=1, algorithm="ac_flow", actor="frozen"):
        return load_config(None, [f"run.iterations={iterations}", f"algorithm.ac_flow.warmup_steps={warmup}",
                                  f"learner.updates_per_batch={updates}", f"algorithm.name={algorithm}",
                                  f"algorithm.ac_flow.warmup_actor={actor}"])

    # learner steps = iterations × updates_per_batch; steps 0 … K−1 are warm-up
    warning = warmup_warning(cfg(20))
    assert warning.startswith("warning: ") and "20 learner steps" in warning and "will not change" in warning
    assert "run.iterations above 20" in warning
    assert warmup_warning(cfg(21)) is None
    assert warmup_warning(cfg(10, updates=2)) is not None  # 20 steps, all warm-up
    assert warmup_warning(cfg(11, updates=2)) is None
    assert "never steers" in warmup_warning(cfg(5, actor="orw"))
    assert warmup_warning(cfg(5, algorithm="orw_cfm_w2")) is None


def test_a_run_from_a_jsonl_dataset_logs_to_tensorboard_what_metrics_jsonl_holds(cluster, tmp_path, small_policy,
                                                                                  capsys):
    """One short end-to-end run for two features: prompts from a .jsonl dataset with metadata
    and a separate evaluation set (`rollout.dataset.path=<file>.jsonl`), and TensorBoard event
    files whose scalars equal metrics.jsonl; plus the console's phase lines and last line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from services.checkpoints import read_driver_state
    from services.datasets import check_cursor, cursor_record, load_prompts

    words = ["zero", "one", "two", "three", "four"]
    path, ev = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"a handwritten {w}", "digit": d}) + "\n"
                            for d, w in enumerate(words)))
    ev.write_text(json.dumps({"prompt": "the digit 3 written by hand", "digit": 3}) + "\n")
    cfg = short_config(tmp_path, small_policy, name="tb", iterations=3, **{
        "run.loggers": "[jsonl,tensorboard]", "rollout.dataset.path": path, "rollout.prompts_per_iteration": 2,
        "eval.dataset.path": ev})
    summary = train(cfg)
    run = tmp_path / "tb"
    assert summary["prompts"] == {"train": str(path), "train_prompts": 5, "eval": str(ev), "eval_prompts": 1,
                                  "metadata_fields": ["digit"]}
    state = read_driver_state(run / "checkpoints" / "iter-0000003")  # what a resume reads
    assert state["prompts"] == cursor_record(cfg, load_prompts(cfg), 3)
    check_cursor(state["prompts"], cfg, load_prompts(cfg), 3)

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["eval", "train", "train", "train", "eval"]
    assert [r["iteration"] for r in rows if r["kind"] == "train"] == [0, 1, 2]
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    logged = {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)
              if not tag.startswith("summary/")}
    expected = _expected(rows)
    assert logged.keys() == expected.keys()
    for key, value in expected.items():  # float32 in the event file; NaN (no spread) stays NaN
        assert (math.isnan(value) and math.isnan(logged[key])) or logged[key] == float(np.float32(value)), key
    assert set(ea.Tags()["images"]) == {"eval/before", "eval/after"}

    out = capsys.readouterr().out.splitlines()
    samples = 1 * cfg.eval.samples_per_prompt  # the evaluation set's one prompt
    phases = ["starting 1 sampler, 1 learner, 1 reward actor", f"baseline evaluation ({samples} samples)",
              f"final evaluation ({samples} samples)"]
    assert [x for x in out if x in phases] == phases
    assert any(x.startswith("warning: this run makes 3 learner steps") for x in out)  # warm-up is 20
    assert any(x.startswith("metrics: http://127.0.0.1:") for x in out)
    assert out[-1] == f"run written to {run} ({summary['seconds']} s); report: {run / 'report.html'}"

"""services/storage.py on real pyarrow filesystems (file:// URIs through FileSystem.from_uri):
uploads as a run writes, what a resume downloads and checks, and the out_dirs a run would lose."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from samplers.policy import save_tensors
from services.checkpoints import LEARNER_FILES, latest_checkpoint, write_checkpoint
from services.config import load_config
from services.storage import RunStorage, check_durable, is_uri, staging_root

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


@pytest.fixture(autouse=True)
def _staging(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRL_STAGING_DIR", str(tmp_path / "stage"))


def _learner(value: float):
    def save(d: Path) -> None:
        for name in LEARNER_FILES:
            save_tensors(d / name, {"w": torch.full((4,), value)}, {"name": name})
    return save


def _checkpoint(storage: RunStorage, it: int, keep: int = 2) -> Path:
    state = {"iteration": it, "version": it, "elapsed_s": 1.0, "totals": {}}
    ckpt = write_checkpoint(storage.local_dir, it, state, _learner(float(it)), keep)
    storage.upload_checkpoint(ckpt, keep)
    return ckpt


def _uri_run(tmp_path: Path) -> tuple[RunStorage, Path]:
    """A run at file://<tmp>/remote/r with config, metrics and two checkpoints (2 and 4) uploaded."""
    storage = RunStorage(f"file://{tmp_path}/remote", "r")
    storage.create()
    run = storage.local_dir
    (run / "config.yaml").write_text("run: {}\n")
    (run / "eval_before.npz").write_bytes(b"before")
    (run / "metrics.jsonl").write_text('{"kind": "train", "iteration": 0}\n')
    _checkpoint(storage, 2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "iteration": 1}\n')
    _checkpoint(storage, 4)
    return storage, tmp_path / "remote" / "r"


def test_a_local_out_dir_is_written_in_place(tmp_path):
    storage = RunStorage(tmp_path / "runs", "r")
    assert not storage.is_uri() and storage.location == str(tmp_path / "runs" / "r")
    assert storage.create() == tmp_path / "runs" / "r" and storage.local_dir.is_dir()
    (storage.local_dir / "x").write_text("x")
    storage.upload(["x"])
    storage.upload_all()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]
    with pytest.raises(FileExistsError, match="already exists"):
        RunStorage(tmp_path / "runs", "r").create()


def test_uri_run_is_staged_locally_and_uploaded_as_written(tmp_path):
    storage, remote = _uri_run(tmp_path)
    assert storage.is_uri() and storage.location == f"file://{tmp_path}/remote/r"
    assert storage.local_dir.is_relative_to(staging_root()) and storage.local_dir.name == "r"
    # after each checkpoint: the checkpoint, latest, and the run's records
    assert (remote / "checkpoints" / "latest").read_text() == "iter-0000004\n"
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["iter-0000002", "iter-0000004", "latest"]
    for name in (*LEARNER_FILES, "driver.json"):
        local = storage.local_dir / "checkpoints" / "iter-0000004" / name
        assert (remote / "checkpoints" / "iter-0000004" / name).read_bytes() == local.read_bytes(), name
    assert (remote / "metrics.jsonl").read_text().count("\n") == 2
    assert (remote / "config.yaml").read_text() == "run: {}\n"
    assert not [p for p in remote.rglob(".*")], "temporaries left at the destination"
    # remote checkpoints are pruned as the local ones are
    _checkpoint(storage, 6, keep=2)
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["iter-0000004", "iter-0000006", "latest"]
    # at the end: everything else, checkpoints/ already there
    (storage.local_dir / "summary.json").write_text("{}")
    (storage.local_dir / "checkpoint").mkdir()
    (storage.local_dir / "checkpoint" / "policy.safetensors").write_bytes(b"p")
    storage.upload_all()
    assert (remote / "summary.json").read_text() == "{}"
    assert (remote / "checkpoint" / "policy.safetensors").read_bytes() == b"p"
    assert storage.location_of(storage.local_dir / "checkpoint") == f"{storage.location}/checkpoint"
    stage = storage.local_dir.parent
    storage.finish(ok=True)
    assert not stage.exists()
    with pytest.raises(FileExistsError, match=f"{storage.location} already exists"):
        RunStorage(f"file://{tmp_path}/remote", "r").create()


def test_resume_downloads_what_it_reads(tmp_path):
    storage, remote = _uri_run(tmp_path)
    storage.finish(ok=True)
    again = RunStorage.of_run(f"file://{tmp_path}/remote/r/")
    assert again.read_text("config.yaml") == "run: {}\n"
    local = again.download_for_resume()
    assert local.name == "r" and local != storage.local_dir
    assert latest_checkpoint(local).name == "iter-0000004"
    for rel in ("config.yaml", "metrics.jsonl", "eval_before.npz", *(f"checkpoints/iter-0000004/{n}" for n in
                                                                       (*LEARNER_FILES, "driver.json"))):
        assert (local / rel).read_bytes() == (remote / rel).read_bytes(), rel
    assert not (local / "checkpoints" / "iter-0000002").exists()  # only the checkpoint latest names
    # the resumed run uploads again, to the same place
    (local / "metrics.jsonl").write_text("resumed\n")
    again.upload(["metrics.jsonl"])
    assert (remote / "metrics.jsonl").read_text() == "resumed\n"


def test_resume_verifies_every_downloaded_tensor_file(tmp_path):
    _, remote = _uri_run(tmp_path)
    victim = remote / "checkpoints" / "iter-0000004" / "optimizer.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the header still reads, the digest no longer matches
    victim.write_bytes(bytes(data))
    again = RunStorage.of_run(f"file://{tmp_path}/remote/r")
    with pytest.raises(ValueError, match=r"remote/r/checkpoints/iter-0000004/optimizer.safetensors: .*SHA-256"):
        again.download_for_resume()
    assert not again.local_dir.parent.exists()  # a refused download leaves no staging behind


@pytest.mark.parametrize("planted", ["../../elsewhere", "iter-0000004/../../x", "iter-12", ""])
def test_resume_refuses_a_latest_naming_anything_else(tmp_path, planted):
    _, remote = _uri_run(tmp_path)
    (remote / "checkpoints" / "latest").write_text(planted + "\n")
    with pytest.raises(ValueError, match="not a checkpoint of this run"):
        RunStorage.of_run(f"file://{tmp_path}/remote/r").download_for_resume()


def test_resume_refuses_links_at_the_uri(tmp_path):
    _, remote = _uri_run(tmp_path)
    outside = tmp_path / "outside.safetensors"
    save_tensors(outside, {"w": torch.zeros(4)}, {"name": "policy.safetensors"})
    policy = remote / "checkpoints" / "iter-0000004" / "policy.safetensors"
    policy.unlink()
    policy.symlink_to(outside)
    with pytest.raises(ValueError, match="policy.safetensors is a link"):
        RunStorage.of_run(f"file://{tmp_path}/remote/r").download_for_resume()
    latest = remote / "checkpoints" / "latest"
    (tmp_path / "pointer").write_text("iter-0000004\n")
    latest.unlink()
    latest.symlink_to(tmp_path / "pointer")
    with pytest.raises(ValueError, match="latest is a link"):
        RunStorage.of_run(f"file://{tmp_path}/remote/r").download_for_resume()


def test_resume_of_a_uri_without_a_checkpoint_says_so(tmp_path):
    storage = RunStorage(f"file://{tmp_path}/remote", "r")
    storage.create()
    with pytest.raises(FileNotFoundError, match="remote/r/checkpoints/latest not found"):
        RunStorage.of_run(storage.location).download_for_resume()


def test_relative_out_dir_under_ray_job_submit_is_refused(tmp_path, monkeypatch):
    # what Ray's job supervisor sets in the environment of a submitted job's driver
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {},
                                                                  "metadata": {"job_submission_id": "raysubmit_1"}}))
    with pytest.raises(ValueError) as err:
        RunStorage("runs", "r")
    msg = str(err.value)
    assert "\n" not in msg and "job raysubmit_1" in msg
    assert "absolute shared path" in msg and "URI" in msg
    RunStorage(tmp_path / "runs", "r").create()  # absolute: fine
    RunStorage(f"file://{tmp_path}/remote", "r").create()


@pytest.mark.parametrize("as_uri", [False, True])
def test_out_dir_inside_rays_temporary_directory_is_refused(tmp_path, monkeypatch, as_uri):
    ray_tmp = tmp_path / "raytmp"
    session = ray_tmp / "session_2026-01-01_00-00-00_000000_1"
    workdir = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    workdir.mkdir(parents=True)
    (ray_tmp / "session_latest").symlink_to(session)
    out = workdir / "runs"
    with pytest.raises(ValueError, match="inside Ray's temporary directory"):
        check_durable(f"file://{out}" if as_uri else out)
    monkeypatch.chdir(workdir)  # a job's driver runs there
    with pytest.raises(ValueError, match="inside Ray's temporary directory"):
        check_durable(f"file://{ray_tmp}/kept" if as_uri else ray_tmp / "kept")
    check_durable(f"file://{tmp_path}/elsewhere" if as_uri else tmp_path / "elsewhere")
    assert os.listdir(tmp_path) == ["raytmp"]  # checking creates nothing


def test_out_dir_config_keeps_uris_as_text():
    assert load_config(None, ["run.out_dir=file:///data/runs/"]).run.out_dir == "file:///data/runs"
    assert load_config(None, ["run.out_dir=s3://bucket/runs"]).run.out_dir == "s3://bucket/runs"
    assert load_config(None, ["run.out_dir=runs"]).run.out_dir == Path("runs")
    assert is_uri("gs://b/x") and not is_uri("runs") and not is_uri(Path("s3://b"))


def test_a_run_at_a_file_uri_is_uploaded_and_resumed_from_it(cluster, tmp_path, trained_uri_run):
    from services.driver import train
    from tests.services.conftest import short_config

    # the session's run trained at file://<its root>/remote/u: short_config, 3 iterations,
    # checkpoints every 2; trained once, looked at here as this test trained it
    shared = trained_uri_run()
    remote, location, summary = shared.remote, shared.location, shared.summary
    assert summary["run_dir"] == location and summary["checkpoint"] == f"{location}/checkpoint/policy.safetensors"
    for name in ("config.yaml", "metrics.jsonl", "eval_before.npz", "summary.json", "report.html",
                 "checkpoint/policy.safetensors", "checkpoint/optimizer.safetensors"):
        assert (remote / name).is_file(), name
    assert (remote / "checkpoints" / "latest").read_text() == "iter-0000003\n"
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["iter-0000002", "iter-0000003", "latest"]
    assert json.loads((remote / "summary.json").read_text())["run_dir"] == location
    assert not list(shared.stage.iterdir())  # the staging copy is gone once all is uploaded
    first = (remote / "metrics.jsonl").read_text().splitlines()

    # resumed from a copy of it at this test's own URI (the shared run stays as it is)
    remote = shared.copy_to(tmp_path / "remote" / "u")
    location = f"file://{tmp_path}/remote/u"
    more = short_config(f"file://{tmp_path}/remote", shared.policy, "u", iterations=4, **{"run.checkpoint_every": 2})
    train(more, resume=location)
    rows = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["kind"] == "train"] == [0, 1, 2, 3]
    assert [r["when"] for r in rows if r["kind"] == "eval"] == ["before", "after"]
    assert (remote / "metrics.jsonl").read_text().splitlines()[:4] == first[:4]  # before + iterations 0–2
    assert (remote / "checkpoints" / "latest").read_text() == "iter-0000004\n"
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["iter-0000003", "iter-0000004", "latest"]
    assert "iterations: 4" in (remote / "config.yaml").read_text()
    assert not list((tmp_path / "stage").iterdir())


def test_cli_resume_of_a_uri_reads_its_config_there(tmp_path, capsys):
    from services.cli import main

    storage, remote = _uri_run(tmp_path)
    (remote / "config.yaml").unlink()
    assert main(["train", "--resume", storage.location]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"{storage.location}/config.yaml not found" in err[0], err

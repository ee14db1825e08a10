"""The cluster workflow of deploy/: `ray job submit` of a digits run to a real Ray head.

A head started with the real `ray start --head` CLI on free ports, token authentication on
(Ray's default), a job submitted with the README's command line, and checks that the driver
joined that cluster rather than starting its own. Also cheap checks of the deploy/ files:
the runtime_env upload, the cluster launcher config (Ray's own schema) and the KubeRay RayJob.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_ports, terminate

# starts Ray processes of its own: the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
ASSETS = ("samplers/assets/digits_policy.safetensors", "reward_workers/assets/digits_classifier.safetensors",
          "reward_workers/assets/digits_clip/model.safetensors")
# Set on `ray start`, inherited by every process of that cluster (GCS, raylet, dashboard, workers,
# the job's driver), so teardown finds exactly this cluster's processes and no other Ray's.
MARKER = "FMRL_TEST_RAY_HEAD"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@dataclass
class RayHead:
    """A head node this module started; ``address`` is its dashboard (job API) URL."""

    address: str
    env: dict[str, str]
    token: str
    temp_dir: Path
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http(self, path: str, authorized: bool = True) -> int:
        """The status of a GET of the dashboard's ``path``."""
        req = urllib.request.Request(self.address + path, headers=self.headers if authorized else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def _free_port_range(n: int) -> tuple[int, int]:
    """``n`` consecutive ports that are free now (Ray's worker ports)."""
    for _ in range(200):
        lo = secrets.randbelow(20000) + 20000
        try:
            for p in range(lo, lo + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return lo, lo + n - 1
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports found")


def _cluster_pids(temp_dir: Path) -> list[int]:
    """Live processes of the cluster under ``temp_dir``: those with MARKER in their environment."""
    want = f"{MARKER}={temp_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if want in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop this head only. Not `ray stop`: it kills every Ray process on the machine by name,
    the clusters of other tests included. SIGTERM to `ray start --block` makes it stop the
    processes it started; anything of this cluster still alive after that is killed."""
    terminate(proc, 20)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _cluster_pids(temp_dir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _cluster_pids(temp_dir)
        if not left:
            return


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """`ray start --head --block` on free ports, 2 CPUs, dashboard on, token auth on."""
    ray_cli = VENV_BIN / "ray"
    if not ray_cli.exists():
        pytest.fail(f"no `ray` next to {sys.executable}; install the project's dependencies", pytrace=False)
    # Short: Ray's Unix sockets live under it and their paths are limited to about 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="fmrl-rh-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    # Token authentication on, as a production cluster should run (and as Ray 2.60 turns it on
    # for a new ray.init cluster), with a token of this cluster's own: never ~/.ray/auth_token,
    # the user's, which `ray start` would otherwise pick up. The job's driver inherits both
    # variables from the head's processes; the CLI and the HTTP clients here send the token.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), MARKER: str(temp_dir),
                # a URI run's staging copy (services/storage.py), not under the user's ~/.cache
                "FMRL_STAGING_DIR": str(temp_dir.with_name(temp_dir.name + "-staging")),
                # The job's entrypoint `fmrl` is found on the PATH of the head's processes.
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0"})
    lo, hi = _free_port_range(40)
    # ten different ports, none among the workers' (one port handed to two components fails `ray start`)
    ports = iter(free_ports(10, avoid=range(lo, hi + 1)))
    dashboard_port = next(ports)
    log = temp_dir / "ray-start.log"
    cmd = [str(ray_cli), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--node-ip-address", "127.0.0.1", "--port", str(next(ports)),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(next(ports)), "--node-manager-port", str(next(ports)),
           "--object-manager-port", str(next(ports)), "--dashboard-agent-listen-port", str(next(ports)),
           "--dashboard-agent-grpc-port", str(next(ports)), "--runtime-env-agent-port", str(next(ports)),
           "--metrics-export-port", str(next(ports)), "--min-worker-port", str(lo), "--max-worker-port", str(hi),
           "--object-store-memory", str(200 * 2**20), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", env, token, temp_dir, log)
    try:
        deadline = time.monotonic() + 90
        while True:  # up when the job API answers an authorised request
            if proc.poll() is not None:
                pytest.fail(f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
            try:
                if head.http("/api/jobs/") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not answer within 90 s:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.5)
        yield head
    finally:
        _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(env["FMRL_STAGING_DIR"], ignore_errors=True)


@pytest.mark.slow
def test_job_api_refuses_requests_without_the_token(ray_head: RayHead) -> None:
    assert ray_head.http("/api/jobs/", authorized=False) == 401
    assert ray_head.http("/api/jobs/") == 200


@pytest.mark.slow
def test_submitted_digits_run_joins_the_cluster(ray_head: RayHead, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    # Durable storage given as a URI: the run is staged on the driver's disk and uploaded there.
    out_dir = tmp_path / "runs"
    location = f"file://{out_dir}/submitted"
    sid = f"fmrl-test-{secrets.token_hex(4)}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--submission-id", sid,
           "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml", "--",
           "fmrl", "train", "--config", "configs/digits_ac_flow.yaml",
           "--set", "run.iterations=3", "--set", "run.progress=false", "--set", f"run.out_dir=file://{out_dir}",
           "--set", "run.checkpoint_every=2",
           "--set", "rollout.prompts_per_iteration=4", "--set", "rollout.samples_per_prompt=4",
           "--set", "eval.samples_per_prompt=4", "--set", "eval.grid_columns=4",
           "--set", "resources.sampler_cpus=0.25", "--set", "resources.learner_cpus=0.25",
           "--set", "resources.reward_cpus=0.25", "--set", "resources.num_samplers=1", "--set", "metrics.port=0",
           "--name", "submitted"]
    client = JobSubmissionClient(ray_head.address, headers=ray_head.headers)
    try:
        # cwd: the repository root, so the relative paths are those of the README's command.
        submit = subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        client.stop_job(sid)
        pytest.fail(f"the job did not finish within 300 s; its logs:\n{client.get_job_logs(sid)[-4000:]}")
    info = client.get_job_info(sid)
    logs = client.get_job_logs(sid)
    assert info.status == JobStatus.SUCCEEDED, (
        f"job {info.status}: {info.message}\n`ray job submit` said:\n{submit.stdout[-3000:]}{submit.stderr[-3000:]}"
        f"\njob logs:\n{logs[-4000:]}")
    assert submit.returncode == 0, submit.stderr[-3000:]

    run_dir = out_dir / "submitted"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["kind"] == "train"] == [0, 1, 2]
    assert [r["when"] for r in rows if r["kind"] == "eval"] == ["before", "after"]
    assert f"run written to {location}" in logs  # the driver's output reached the job's logs
    assert summary["run_dir"] == location
    # Durable: everything where the config said, nothing left in Ray's session directory
    # (which Ray deletes) nor in the staging copy (removed once uploaded).
    for name in ("config.yaml", "eval_before.npz", "summary.json", "report.html", "checkpoint/policy.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter-0000003\n"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter-0000002", "iter-0000003", "latest"]
    assert not [p for p in ray_head.temp_dir.rglob("submitted*")]
    assert not any(Path(ray_head.env["FMRL_STAGING_DIR"]).iterdir())

    # Joined, not embedded: a driver that started its own Ray would never register with this
    # head's GCS under the submission id, and its actors would live in that other cluster.
    assert info.driver_info is not None, "the job's driver never connected to the submitting cluster"
    actors = StateApiClient(ray_head.address, headers=ray_head.headers).list(
        StateResource.ACTORS, options=ListApiOptions(filters=[("job_id", "=", info.driver_info.id)], detail=True),
        raise_on_missing_output=False)
    classes = sorted(a.class_name for a in actors)
    assert classes == ["LearnerWorker", "RewardWorker", "SamplerWorker"], classes

    # The code ran from the uploaded working directory, which held the assets and not the venv/runs.
    uri = info.runtime_env["working_dir"]
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip"), uri
    unpacked = (ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
                / uri.removeprefix("gcs://").removesuffix(".zip"))
    for asset in ASSETS:
        assert (unpacked / asset).is_file(), asset
    for big in (".venv", "runs", ".git"):
        assert not (unpacked / big).exists(), big


@pytest.mark.slow
def test_submitted_run_refuses_a_relative_out_dir(ray_head: RayHead) -> None:
    """A relative run.out_dir under a job would land in Ray's unpacked working_dir, which Ray
    deletes: the job fails at once with one line saying what to give instead."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sid = f"fmrl-test-{secrets.token_hex(4)}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--submission-id", sid,
           "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml", "--",
           "fmrl", "train", "--config", "configs/digits_ac_flow.yaml", "--set", "run.out_dir=runs",
           "--set", "metrics.port=0", "--name", "relative"]
    client = JobSubmissionClient(ray_head.address, headers=ray_head.headers)
    try:
        subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        client.stop_job(sid)
        pytest.fail(f"the job did not finish within 300 s; its logs:\n{client.get_job_logs(sid)[-4000:]}")
    info, logs = client.get_job_info(sid), client.get_job_logs(sid)
    assert info.status == JobStatus.FAILED, f"job {info.status}\n{logs[-4000:]}"
    errors = [line for line in logs.splitlines() if "run.out_dir='runs' is relative" in line]
    assert len(errors) == 1 and "absolute shared path" in errors[0] and "URI" in errors[0], logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert not [p for p in ray_head.temp_dir.rglob("relative*")]


def test_runtime_env_upload_is_small_and_keeps_the_assets(tmp_path: Path) -> None:
    """What `ray job submit --working-dir .` would upload, built by Ray's own packaging code
    (private API, the one the job SDK calls), .gitignore not consulted: the excludes alone
    keep it small."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    env = _load("runtime_env.yaml")
    assert set(env) == {"excludes", "env_vars"}
    # the user's HF_HUB_OFFLINE stands: the job file does not force the hub off
    assert "HF_HUB_OFFLINE" not in env["env_vars"]
    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=False, excludes=env["excludes"], logger=None)
    size = pkg.stat().st_size
    assert size < 32 * 2**20 < GCS_STORAGE_MAX_SIZE, f"{size / 2**20:.1f} MiB"
    names = set(zipfile.ZipFile(pkg).namelist())
    for asset in ASSETS:
        assert asset in names, asset
    for name in names:
        top = name.split("/")[0]
        assert top not in {".git", ".venv", "runs", "checkpoints"} and not name.endswith((".npz", ".pyc")), name
    assert "services/cli.py" in names and "configs/digits_ac_flow.yaml" in names


def test_cluster_launcher_config_passes_rays_schema() -> None:
    """deploy/ray-cluster.yaml as `ray up` would check it before touching a cloud: defaults
    filled from the provider's file, then Ray's JSON schema (all offline)."""
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = _load("ray-cluster.yaml")
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["head"]["resources"].get("GPU", 0) == 0  # no GPU actor on the head
    assert types["inference_gpu"]["resources"]["inference_gpu"] >= 1
    assert types["training_gpu"]["resources"]["training_gpu"] >= 1
    assert any("pip install -e" in c for c in config["setup_commands"])


def test_kuberay_rayjob_manifest() -> None:
    job = _load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("fmrl train --config /app/configs/digits_ac_flow.yaml ")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == _load("runtime_env.yaml")["env_vars"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"inference-gpu", "training-gpu"}
    for name, group in groups.items():
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        # KubeRay's form: a shell-quoted JSON object, '"{\"name\": 1}"' in the YAML.
        custom = json.loads(group["rayStartParams"]["resources"].strip('"').replace('\\"', '"'))
        assert custom == {name.replace("-", "_"): int(container["resources"]["limits"]["nvidia.com/gpu"])}, name
    # the entrypoint's overrides are a valid config whose samplers and learner declare the
    # custom resource of their own group, so each role is placed only there
    from services.config import load_config

    words = shlex.split(spec["entrypoint"])
    cfg = load_config(None, [words[i + 1] for i, w in enumerate(words) if w == "--set"])
    assert cfg.resources.sampler_resources == {"inference_gpu": 1.0}
    assert cfg.resources.learner_resources == {"training_gpu": 1.0}

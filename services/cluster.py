"""Which Ray cluster a run joins, and who can reach it.

- ``RAY_ADDRESS`` set (a job under ``ray job submit``, or a user naming a cluster): join that
  cluster; its own settings (interfaces, auth, ports) stand.
- Otherwise an embedded cluster, always a new one: ``address="local"``, because a bare
  ``ray.init()`` joins whatever cluster the machine's last ``ray start`` recorded in
  ``$RAY_TMPDIR/ray/ray_current_cluster`` — someone else's live head, or a dead one whose stale
  record makes ``ray.init`` retry for about 12 minutes. The embedded cluster listens on
  127.0.0.1 only, and its processes do not outlive the driver (``services.cluster_guard``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import ray

from services import cluster_guard
from services.config import TrainConfig

LOOPBACK = "127.0.0.1"
# Defaults of every actor's environment. HF_HUB_OFFLINE is not one of them: the models the
# project ships load with local_files_only=True, and a hub id (policy.pretrained) downloads
# unless the user set HF_HUB_OFFLINE=1 (actor_env forwards it).
_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false"}
_guard: subprocess.Popen | None = None  # the guard of this process's embedded cluster, if any


def actor_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The env_vars of the runtime_env the driver gives every actor: ``_ENV``, overridden by
    the user's own ``HF_*`` variables (HF_HUB_OFFLINE, HF_HOME, HF_ENDPOINT, ...), which
    actors on other nodes would not otherwise see. Tokens (``*TOKEN*``) are not copied: Ray
    shows a job's runtime_env in its dashboard and job API, so a cluster's nodes get HF_TOKEN
    from their own environment (a Kubernetes secret, the launcher's setup)."""
    environ = os.environ if environ is None else environ
    hf = {k: v for k, v in environ.items() if k.startswith("HF_") and "TOKEN" not in k}
    return {**_ENV, **hf}


def ensure_ray(cfg: TrainConfig) -> bool:
    """Join the cluster at RAY_ADDRESS if set, else start an embedded one. True if started here."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

        # Under `ray job submit` Ray merges the job's runtime_env into ray.init's and refuses
        # (ValueError) an env var both set, so the job's values (deploy/runtime_env.yaml) win.
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
        taken = (job.get("runtime_env") or {}).get("env_vars") or {}
        env = {"env_vars": {k: v for k, v in actor_env().items() if k not in taken}}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, logging_level=logging.WARNING)
        return False
    start_embedded(embedded_cpus(cfg))
    return True


def embedded_cpus(cfg: TrainConfig) -> int:
    """The CPUs an embedded cluster advertises: resources.ray_num_cpus when set, else this machine's
    cores, or as many as the run's actors declare when that is more (Ray's CPUs are logical: on a
    laptop the actors share the cores either way, and a learner group's extra ranks still fit)."""
    r = cfg.resources
    if r.ray_num_cpus is not None:
        return r.ray_num_cpus
    return max(os.cpu_count() or 1, math.ceil(r.declared("cpus")))


def embedded() -> bool:
    """Whether this process runs on a cluster it started itself (which nothing else joins)."""
    return _guard is not None and _guard.poll() is None and ray.is_initialized()


def start_embedded(num_cpus: int | None) -> None:
    """A new single-node cluster on 127.0.0.1 whose processes end with this one."""
    _close_guard()  # a previous embedded cluster of this process is shut down by now
    from ray._common.utils import get_default_ray_temp_dir  # where ray.init puts its sessions

    cluster_guard.reap_orphans(Path(get_default_ray_temp_dir()))
    mark = f"{os.getpid()}.{cluster_guard.start_time(os.getpid())}.{secrets.token_hex(4)}"
    with _set_env(cluster_guard.MARK_VAR, mark), _loopback_node_ip():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK,
                 _node_ip_address=LOOPBACK, runtime_env={"env_vars": actor_env()},
                 logging_level=logging.WARNING, configure_logging=True)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the embedded Ray cluster came up on {node_ip}, not {LOOPBACK}: this Ray "
                           f"({ray.__version__}) no longer honours the loopback switch of services/cluster.py")
    _start_guard(mark)


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Let ``ray.init`` keep 127.0.0.1 as the node's IP.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback
    address by the machine's outward IP unless Ray clusters are disabled
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import, so the constant itself is
    switched here while the node starts). With a loopback node IP every Ray component binds
    127.0.0.1 — GCS, raylet, core workers, the agents, the dashboard head and the autoscaler's
    metrics servers (Ray's ``is_localhost`` checks) — and workers report it as their node IP.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _set_env(name: str, value: str) -> Iterator[None]:
    """``name=value`` in the environment the processes started inside inherit."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _start_guard(mark: str) -> None:
    """Start the process that stops the cluster marked ``mark`` once this one is gone."""
    global _guard
    if cluster_guard.start_time(os.getpid()) is None:  # no /proc: nothing to find processes by
        return
    from ray._private import worker

    node = worker._global_node  # noqa: SLF001 - Ray's record of this session's directories
    session = node.get_session_dir_path()
    (Path(session) / cluster_guard.MARK_FILE).write_text(mark + "\n")  # for reap_orphans
    with (Path(node.get_logs_dir_path()) / "fmrl_cluster_guard.err").open("a") as err:
        # Own session: a signal to the driver's process group (Ctrl-C, a job runner) spares it.
        _guard = subprocess.Popen([sys.executable, "-I", cluster_guard.__file__, mark, session],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                  start_new_session=True)


def _close_guard() -> None:
    """Let the previous guard of this process sweep its (shut down) cluster and exit."""
    global _guard
    if _guard is not None:
        _guard.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _guard.wait(30)
        _guard = None

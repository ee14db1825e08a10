"""A run's checkpoints and what resuming reads: checkpoints/iter-NNNNNNN/ written whole or not
at all, checkpoints/latest naming one of the run's own, every file verified on load, every
damaged or planted file refused by name, and everything a resume reads checked before the run
writes anything (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.settings import flatten
from samplers.policy import replace_atomically, save_diffusers_layout, tensor_file_metadata
from services.config import TrainConfig, load_config
from services.evaluation import Evaluation

CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"iter-\d{7}")
LEARNER_FILES = ("policy.safetensors", "rollout.safetensors", "optimizer.safetensors")

# What `--resume --set` may change. Everything else is fixed by the checkpoint's state (the
# optimiser's hyper-parameters, the trackers, the objective) or by exactness (the prompts and
# seeds of every iteration, the rollout batch, the evaluation the "before" figures used), and
# is refused rather than recorded in config.yaml and silently ignored. learner.lr is applied
# from the checkpoint's step on (Learner.load rebases the schedule).
RESUME_KEYS = ("run.iterations", "run.checkpoint_every", "run.keep_checkpoints", "run.progress", "run.loggers",
               "learner.lr", "learner.sharding", "learner.gradient_checkpointing", "pipeline.weight_sync",
               "pipeline.sync_timeout_s", "pipeline.dist_backend")
RESUME_SECTIONS = ("metrics.", "resources.")
RESUME_FIXED = ("resources.num_samplers", "resources.torch_threads")  # change the batch's float arithmetic


def check_resume_overrides(saved: TrainConfig, cfg: TrainConfig) -> None:
    """Refuse, naming them and what may change, the keys in which ``cfg`` differs from the run's
    ``saved`` config that a resumed run could not honour (run.name and run.out_dir locate the run)."""
    old, new = flatten(saved.model_dump(mode="json")), flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                     and k not in ("run.name", "run.out_dir"))
    bad = [k for k in changed if k in RESUME_FIXED or not (k in RESUME_KEYS or k.startswith(RESUME_SECTIONS))]
    if bad:
        raise ValueError(f"--resume cannot change {', '.join(bad)}: the checkpoint fixes it; a resumed run may change "
                         f"only {', '.join(RESUME_KEYS)}, metrics.* and resources.* (not "
                         f"{' or '.join(RESUME_FIXED)})")


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory holding a link that leads out of it: a run writes no links, and
    reading or replacing through one would load or overwrite another run's (or any) file."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory")
    root = run_dir.resolve()
    for here, dirs, files in os.walk(run_dir):  # a linked directory is listed, not entered
        for name in dirs + files:
            path = Path(here) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ValueError(f"{path} is a link to {path.resolve()}, outside the run directory {run_dir}; "
                                 "refusing the run")


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: written to a fresh temporary file
    beside it (never an existing name, so never through a planted link), flushed, renamed over it."""
    replace_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _remove(path: Path) -> None:
    """Remove a file, a link (not its target) or a directory tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, next_it: int, state: dict[str, Any], save_learner: Callable[[Path], Any],
                     keep: int) -> Path:
    """checkpoints/iter-<next_it>/: the learner's files (``save_learner`` writes them into the
    directory it is given) and driver.json, made complete and flushed to disk in a fresh
    temporary directory and then renamed, and checkpoints/latest naming it (replaced atomically);
    a run killed at any moment leaves its previous checkpoint whole, and the next save clears
    what the killed one left (dot-named temporaries)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    for left in root.glob(".*"):
        _remove(left)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".iter-{next_it:07d}."))
    tmp.chmod(0o755)
    save_learner(tmp)
    write_text_atomic(tmp / "driver.json", json.dumps(state, indent=1) + "\n")
    _fsync_dir(tmp)
    final = root / f"iter-{next_it:07d}"
    _remove(final)
    tmp.rename(final)
    write_text_atomic(root / "latest", final.name + "\n")
    _fsync_dir(root)
    for old in sorted(p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name))[:-keep]:
        _remove(old)
    return final


def link_final_checkpoint(ckpt: Path, dest: Path) -> str:
    """``dest`` (the run's checkpoint/): the learner files of its last checkpoint, which the run
    wrote at its final iteration and which nothing has changed since, hard-linked rather than
    written again (a copy where links cannot be made); pruning ``ckpt`` later keeps them, and
    each file's recorded digest travels with it. Beside them, the policy in the layout diffusers
    loads (``save_diffusers_layout``): ``pytorch_lora_weights.safetensors`` for an adapter,
    ``transformer/`` for full weights. Only here, not in every iter-N checkpoint: those exist to
    resume, and a second copy of full SD3 weights in each would double their size; ``fmrl
    export`` makes the same layout from any checkpoint. Returns the policy file's path."""
    for left in dest.parent.glob(f".{dest.name}.*"):
        _remove(left)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    tmp.chmod(0o755)
    for name in LEARNER_FILES:
        try:
            os.link(ckpt / name, tmp / name)
        except OSError:
            shutil.copy2(ckpt / name, tmp / name)
    save_diffusers_layout(tmp / "policy.safetensors", tmp)
    _remove(dest)
    tmp.rename(dest)
    return str((dest / "policy.safetensors").resolve())


def _read_pointer(pointer: Path) -> str:
    """checkpoints/latest's text, read without following a link (a run writes a plain file)."""
    try:
        fd = os.open(pointer, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise FileNotFoundError(f"{pointer.parent.parent} has no resumable checkpoint ({pointer} missing); "
                                "runs write one every run.checkpoint_every iterations") from None
    except OSError as exc:  # ELOOP: a link
        raise ValueError(f"{pointer} is not a plain file ({exc.strerror}); refusing it") from None
    with os.fdopen(fd, "rb") as f:
        return f.read(256).decode("utf-8", errors="replace").strip()


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that checkpoints/latest names: only a checkpoint of this run
    (checkpoints/iter-NNNNNNN, a plain directory of plain files with its driver.json)."""
    root = run_dir / CHECKPOINTS
    pointer = root / "latest"
    name = _read_pointer(pointer)
    if not CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"{pointer} names {name[:80]!r}, not a checkpoint of this run (iter-NNNNNNN); refusing it")
    ckpt = root / name
    if ckpt.is_symlink() or not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt} named by {pointer} is not a directory of this run")
    links = [p.name for p in ckpt.iterdir() if p.is_symlink()]
    if links:
        raise ValueError(f"checkpoint {ckpt} holds links ({', '.join(sorted(links))}); a run writes none: refusing it")
    if not (ckpt / "driver.json").is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} named by {pointer} is incomplete (no driver.json)")
    return ckpt


def read_driver_state(ckpt: Path) -> dict[str, Any]:
    """driver.json of a checkpoint: the iteration to continue at, the published version, the
    elapsed time, the pipeline's totals and (a dataset's run) the prompt cursor; a one-line
    error naming the file otherwise."""
    path = ckpt / "driver.json"
    try:
        raw = json.loads(path.read_text())
        state = {"iteration": int(raw["iteration"]), "version": int(raw["version"]),
                 "elapsed_s": float(raw["elapsed_s"]), "totals": dict(raw["totals"])}
        if raw.get("prompts") is not None:  # rollout.dataset's cursor (services/datasets.py)
            state["prompts"] = dict(raw["prompts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid checkpoint record ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if f"iter-{state['iteration']:07d}" != ckpt.name:
        raise ValueError(f"{path} records iteration {state['iteration']}, its directory is {ckpt.name}")
    return state


def check_checkpoint_files(ckpt: Path) -> None:
    """The learner's files are there and whole (headers read only; the learner verifies their
    digests when it loads them)."""
    for name in LEARNER_FILES:
        tensor_file_metadata(ckpt / name)


def load_before(path: Path) -> Evaluation:
    """The run's "before" evaluation (a resumed run reports the original one)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: a resumed run reports the run's first evaluation from it")
    try:
        return Evaluation.load(path)
    except Exception as exc:  # numpy/zipfile/json raise many types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {first})") from None


def metrics_upto(path: Path, next_it: int) -> list[str]:
    """The lines of a run's metrics.jsonl that precede iteration ``next_it``. A partial last
    line (a run stopped mid-write) is dropped, and said so; any other bad line is an error
    naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: a resumed run continues the run's metrics from it")
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    keep = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            kind = row["kind"]
            # an evaluation between batches after k iterations precedes the checkpoint at k
            if (kind == "eval" and row["when"] == "before") or (kind == "train" and int(row["iteration"]) < next_it) \
                    or (kind == "eval" and row["when"] == "iteration" and int(row["iteration"]) <= next_it):
                keep.append(line)
        except (ValueError, KeyError, TypeError) as exc:
            if i == len(lines):
                print(f"{path}: dropped its partial last line (line {i}, a run stopped mid-write)")
                break
            raise ValueError(f"{path} line {i} is not a metrics record ({type(exc).__name__}: {exc})") from None
    return keep


@dataclass
class Resume:
    """What resuming a run reads from its directory, all of it read and checked before the run
    writes anything or starts a cluster."""

    run_dir: Path
    ckpt: Path
    state: dict[str, Any]
    before: Evaluation
    lines: list[str]


def prepare_resume(run_dir: Path, cfg: TrainConfig) -> Resume:
    """Check that ``run_dir`` can continue under ``cfg`` and read what it continues from."""
    check_run_dir(run_dir)
    check_resume_overrides(load_config(run_dir / "config.yaml", run=True), cfg)
    ckpt = latest_checkpoint(run_dir)
    state = read_driver_state(ckpt)
    if cfg.run.iterations < state["iteration"]:
        raise ValueError(f"run.iterations={cfg.run.iterations} is before the checkpoint {ckpt} "
                         f"(iteration {state['iteration']})")
    check_checkpoint_files(ckpt)
    return Resume(run_dir, ckpt, state, load_before(run_dir / "eval_before.npz"),
                  metrics_upto(run_dir / "metrics.jsonl", state["iteration"]))


def nothing_to_keep(run_dir: Path) -> bool:
    """A run directory with no checkpoint and no trained iteration (a run that failed before
    its first iteration): nothing in it can be resumed or tells anything about training."""
    if (run_dir / CHECKPOINTS / "latest").exists():
        return False
    metrics = run_dir / "metrics.jsonl"
    return not metrics.is_file() or '"kind": "train"' not in metrics.read_text(errors="replace")

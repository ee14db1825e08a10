"""Where a run's directory lives: a local (shared) path, or a URI with a local staging copy.

``run.out_dir`` is either a path or a URI that pyarrow's filesystems understand (``file://``,
``s3://``, ``gs://``, as Ray Train's ``storage_path``). With a path, the run writes there and
nothing is copied. With a URI, the run writes into a staging directory on the driver's disk
and every output is uploaded as it is written: after each checkpoint the checkpoint's files,
then ``checkpoints/latest`` (so the remote ``latest`` only ever names a whole checkpoint),
metrics.jsonl, config.yaml and eval_before.npz; at the end of the run everything else (the
final checkpoint/, summary, report, figures). Each file is uploaded atomically where the
filesystem allows: on a local or mounted filesystem into a temporary name then renamed, on an
object store as one put (an object appears whole or not at all).

Staging lives under ``$FMRL_STAGING_DIR``, else ``$XDG_CACHE_HOME/fmrl/staging`` (default
``~/.cache/fmrl/staging``): on disk, never a RAM-backed /tmp (an SD3 checkpoint is gigabytes),
outside Ray's session directories, one fresh directory per run or resume so runs never share
one. It is removed when the run ends well; a run that fails keeps it and says where (it may
hold what had not been uploaded yet).

Under ``ray job submit`` the driver's working directory is Ray's unpacked copy of the job's
working_dir (``<ray temp>/session_*/runtime_resources/working_dir_files/…``), which Ray
deletes: a relative ``out_dir`` there would lose the run, so it is refused, as is any
``out_dir`` inside Ray's temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from services.checkpoints import CHECKPOINT_NAME, CHECKPOINTS
from services.loggers import RunLogger

URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
RESUME_FILES = ("config.yaml", "metrics.jsonl", "eval_before.npz")
"""What resuming reads besides the latest checkpoint (services.checkpoints.prepare_resume)."""
RESUME_OPTIONAL = ("trackers.json",)
"""Read by a resume where the run has it (the ids of its experiment trackers' runs)."""
STAGING_ENV = "FMRL_STAGING_DIR"
_CHUNK = 8 * 2**20


def is_uri(out_dir: str | Path) -> bool:
    """``out_dir`` names a filesystem by scheme (``file://``, ``s3://``, …) rather than a path."""
    return isinstance(out_dir, str) and URI.match(out_dir) is not None


def job_submission_id() -> str | None:
    """The submission id when this process is the driver of a ``ray job submit`` job (Ray's job
    supervisor gives the driver the job's config, with that id in its metadata), else None."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return None
    try:
        job = json.loads(raw)
    except ValueError:
        return "unknown"  # set by Ray, so a job all the same
    return str((job.get("metadata") or {}).get("job_submission_id") or "unknown")


def ray_temp_dirs(path: Path) -> list[Path]:
    """Ray's temporary directories that ``path`` could lie in: Ray's default one, and the parent
    of any ``session_*`` directory above ``path`` or above the working directory (a job's
    driver runs inside one) that holds Ray's ``session_latest`` link."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    found = [Path(base).resolve() / "ray"]
    for p in (path, Path.cwd().resolve()):
        for above in p.parents:
            if above.name.startswith("session_") and (above.parent / "session_latest").exists():
                found.append(above.parent)
    return found


def check_durable(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` the run would lose: one inside Ray's temporary directory, or a
    relative one under ``ray job submit`` (it would land in Ray's copy of the working_dir)."""
    if is_uri(out_dir):
        if not str(out_dir).startswith("file://"):
            return
        local = Path(str(out_dir).removeprefix("file://"))
    else:
        local = Path(out_dir)
        job = job_submission_id()
        if job is not None and not local.is_absolute():
            raise ValueError(f"run.out_dir={str(out_dir)!r} is relative, and job {job} runs in Ray's temporary "
                             f"working directory ({Path.cwd()}), which Ray deletes: give an absolute shared "
                             "path (run.out_dir=/shared/runs) or a URI (run.out_dir=s3://bucket/runs)")
    resolved = local.resolve()
    for temp in ray_temp_dirs(resolved):
        if resolved.is_relative_to(temp):
            raise ValueError(f"run.out_dir={str(out_dir)!r} lies inside Ray's temporary directory {temp}, which "
                             "Ray deletes: give an absolute shared path or a URI (run.out_dir=s3://bucket/runs)")


def staging_root() -> Path:
    """Where URI runs stage their files (see the module's docstring)."""
    if os.environ.get(STAGING_ENV):
        return Path(os.environ[STAGING_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fmrl" / "staging"


class RunStorage:
    """One run's directory: ``local_dir`` is where the run reads and writes; with a URI it is a
    staging copy and ``upload``/``download_for_resume`` move files between it and ``location``."""

    def __init__(self, out_dir: str | Path, name: str) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"run.name={name!r} is not a directory name")
        check_durable(out_dir)
        self.name = name
        self._created = False  # by this object: only then may a failed run remove it
        self._uri = is_uri(out_dir)
        if self._uri:
            from pyarrow.fs import FileSystem

            base = str(out_dir).rstrip("/")
            try:
                self.fs, root = FileSystem.from_uri(base)
            except Exception as exc:  # pyarrow raises ArrowInvalid/OSError/… for a URI it cannot use
                raise ValueError(f"run.out_dir={base!r}: {str(exc).splitlines()[0]}") from None
            self.location = f"{base}/{name}"
            self.remote = f"{root.rstrip('/')}/{name}"
            # made when the run is created or downloaded, so a refused run leaves nothing behind
            self._stage = staging_root() / f"{name}.{secrets.token_hex(6)}"
            self.local_dir = self._stage / name
            self._sent: dict[str, tuple[int, int]] = {}  # file → (size, mtime) when last uploaded
        else:
            self.fs, self.remote, self._stage = None, "", None
            self.local_dir = Path(out_dir) / name
            self.location = str(self.local_dir)

    @classmethod
    def of_run(cls, run: str | Path) -> RunStorage:
        """The storage of an existing run, from its location (``out_dir/name``, URI or path)."""
        text = str(run).rstrip("/")
        if is_uri(text):
            parent, _, name = text.rpartition("/")
            if "://" not in parent or parent.endswith("://"):
                raise ValueError(f"{text} names no run directory (expected <out_dir URI>/<run name>)")
            return cls(parent, name)
        path = Path(text)
        return cls(path.parent, path.name)

    def is_uri(self) -> bool:
        """The run lives at a URI (files are staged locally and uploaded)."""
        return self._uri

    @property
    def out_dir(self) -> str | Path:
        """The ``run.out_dir`` this run lives under."""
        return self.location.rpartition("/")[0] if self._uri else self.local_dir.parent

    def location_of(self, local: str | Path) -> str:
        """Where a file of ``local_dir`` lives at the run's location (its URI, or the path itself)."""
        if not self._uri:
            return str(local)
        return f"{self.location}/{Path(local).resolve().relative_to(self.local_dir.resolve()).as_posix()}"

    def exists(self) -> bool:
        """Something is already at the run's location."""
        if not self._uri:
            return self.local_dir.exists() or self.local_dir.is_symlink()
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.remote).type != FileType.NotFound

    def create(self) -> Path:
        """Make the run's (empty) directory, refusing a name that is taken; returns ``local_dir``."""
        if self.exists():
            raise FileExistsError(f"run directory {self.location} already exists; choose another run.name")
        if self._uri:
            self.fs.create_dir(self.remote, recursive=True)
        self.local_dir.mkdir(parents=True)
        self._created = True
        return self.local_dir

    def upload(self, paths: Iterable[str | Path]) -> None:
        """Copy these files or directories (relative to ``local_dir`` or inside it) to the run's
        location, each file atomically; dot-named temporaries and files unchanged since their
        last upload are skipped. Nothing to do for a local run."""
        if not self._uri:
            return
        for p in paths:
            path = p if Path(p).is_absolute() else self.local_dir / p
            path = Path(path)
            if not path.absolute().is_relative_to(self.local_dir.absolute()):
                raise ValueError(f"{path} is not inside the run directory {self.local_dir}")
            if path.is_symlink():
                raise ValueError(f"{path} is a link; a run writes none, refusing to upload it")
            if path.is_dir():
                for here, dirs, files in os.walk(path):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    self.upload(Path(here) / f for f in sorted(files) if not f.startswith("."))
            else:
                rel, st = path.relative_to(self.local_dir).as_posix(), path.stat()
                if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                    self._put(path, rel)
                    self._sent[rel] = (st.st_size, st.st_mtime_ns)

    def upload_checkpoint(self, ckpt: Path, keep: int) -> None:
        """After ``write_checkpoint``: the checkpoint's files, then ``checkpoints/latest`` naming
        it, then the run's records, then the remote checkpoints beyond the ``keep`` newest
        removed (as ``write_checkpoint`` prunes the local ones)."""
        if not self._uri:
            return
        self.upload([ckpt])
        self.upload([f"{CHECKPOINTS}/latest"])
        self.upload(f for f in RESUME_FILES + RESUME_OPTIONAL if (self.local_dir / f).is_file())
        from pyarrow.fs import FileSelector, FileType

        root = f"{self.remote}/{CHECKPOINTS}"
        names = sorted(i.base_name for i in self.fs.get_file_info(FileSelector(root))
                       if i.type == FileType.Directory and CHECKPOINT_NAME.fullmatch(i.base_name))
        for old in names[:-keep]:
            self.fs.delete_dir(f"{root}/{old}")

    def upload_all(self) -> None:
        """At the end of a run: every file of the run not uploaded yet or changed since, but
        checkpoints/ (uploaded as each is written)."""
        if self._uri:
            self.upload(p for p in sorted(self.local_dir.iterdir())
                        if p.name != CHECKPOINTS and not p.name.startswith("."))

    def read_text(self, rel: str, limit: int = 2**24) -> str:
        """A small file of the run (say config.yaml), read from its location."""
        if not self._uri:
            return (self.local_dir / rel).read_text()
        self._refuse_link(rel)
        try:
            with self.fs.open_input_stream(f"{self.remote}/{rel}") as f:
                return f.read(limit).decode("utf-8", errors="replace")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.location}/{rel} not found: {self.location} is not a run directory "
                                    "(or not one that can be resumed)") from None

    def download_for_resume(self) -> Path:
        """Copy into ``local_dir`` what resuming reads: config.yaml, the checkpoint that
        ``checkpoints/latest`` names (only one of this run: iter-NNNNNNN) with every tensor
        file's SHA-256 digest verified as the loader verifies it, ``latest`` itself,
        metrics.jsonl and eval_before.npz. Returns ``local_dir`` (checked again there by
        ``prepare_resume``)."""
        if not self._uri:
            return self.local_dir
        try:
            return self._download()
        except BaseException:
            shutil.rmtree(self._stage, ignore_errors=True)  # a partial copy is of no use
            raise

    def _download(self) -> Path:
        from pyarrow.fs import FileSelector, FileType

        self.local_dir.mkdir(parents=True)
        self._refuse_link(CHECKPOINTS)
        name = self.read_text(f"{CHECKPOINTS}/latest", 256).strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise ValueError(f"{self.location}/{CHECKPOINTS}/latest names {name[:80]!r}, not a checkpoint of "
                             "this run (iter-NNNNNNN); refusing it")
        for rel in RESUME_FILES:
            self._get(rel)
        for rel in RESUME_OPTIONAL:
            if self.fs.get_file_info(f"{self.remote}/{rel}").type == FileType.File:
                self._get(rel)
        ckpt_rel = f"{CHECKPOINTS}/{name}"
        prefix = f"{self.remote}/{ckpt_rel}"
        if self.fs.get_file_info(prefix).type != FileType.Directory:
            raise FileNotFoundError(f"checkpoint {self.location}/{ckpt_rel} named by {CHECKPOINTS}/latest is not "
                                    "a directory of this run")
        self._refuse_link(ckpt_rel)
        (self.local_dir / ckpt_rel).mkdir(parents=True)
        for info in sorted(self.fs.get_file_info(FileSelector(prefix, recursive=True)), key=lambda i: i.path):
            rel = info.path[len(prefix):].strip("/")
            if not info.path.startswith(prefix + "/") or any(part in ("", ".", "..") for part in rel.split("/")):
                raise ValueError(f"{self.location}/{ckpt_rel} lists {info.path!r}, not a file of it; refusing it")
            if info.type == FileType.Directory:
                self._refuse_link(f"{ckpt_rel}/{rel}")
                (self.local_dir / ckpt_rel / rel).mkdir(parents=True, exist_ok=True)
            elif info.type == FileType.File:
                self._get(f"{ckpt_rel}/{rel}")
            else:
                raise ValueError(f"{self.location}/{ckpt_rel}/{rel} is not a plain file; refusing the checkpoint")
        (self.local_dir / CHECKPOINTS / "latest").write_text(name + "\n")
        self._verify(self.local_dir / ckpt_rel)
        return self.local_dir

    def discard(self) -> None:
        """A new run that stopped before its first iteration: its remote directory (holding no
        checkpoint) and its staging copy removed, so its name is free again."""
        if self._uri and self._created:
            from pyarrow.fs import FileType

            if self.fs.get_file_info(f"{self.remote}/{CHECKPOINTS}/latest").type == FileType.NotFound:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_dir(self.remote)
            shutil.rmtree(self._stage, ignore_errors=True)

    def finish(self, ok: bool) -> None:
        """The run ended: a URI run's staging directory is removed if ``ok`` (everything is at its
        location), kept otherwise and said so."""
        if self._stage is None or not self._stage.exists():
            return
        if ok:
            shutil.rmtree(self._stage, ignore_errors=True)
        else:
            print(f"staging copy of {self.location} kept in {self.local_dir} (what it holds past the last "
                  "checkpoint may not have been uploaded)")

    # ---- transfers ------------------------------------------------------------------------

    def _put(self, path: Path, rel: str) -> None:
        dest = f"{self.remote}/{rel}"
        parent, _, base = dest.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        # A rename is atomic on a local or mounted filesystem; on an object store a put is
        # atomic by itself and a rename would be a second, non-atomic copy.
        tmp = f"{parent}/.{base}.{secrets.token_hex(4)}.tmp" if self.fs.type_name == "local" else dest
        try:
            with path.open("rb") as src, self.fs.open_output_stream(tmp) as out:
                shutil.copyfileobj(src, out, _CHUNK)
            if tmp != dest:
                self.fs.move(tmp, dest)
        except BaseException:
            if tmp != dest:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(tmp)
            raise

    def _get(self, rel: str) -> None:
        self._refuse_link(rel)
        local = self.local_dir / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open_input_stream(f"{self.remote}/{rel}") as src, local.open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
        except FileNotFoundError:
            local.unlink(missing_ok=True)
            raise FileNotFoundError(f"{self.location}/{rel} missing: a resumed run reads it") from None

    def _refuse_link(self, rel: str) -> None:
        """On a local filesystem, refuse a link at ``rel`` (pyarrow follows links silently)."""
        if self.fs.type_name == "local" and os.path.islink(f"{self.remote}/{rel}"):
            raise ValueError(f"{self.location}/{rel} is a link; a run writes none: refusing it")

    def _verify(self, ckpt: Path) -> None:
        """Every tensor file of a downloaded checkpoint read whole and its recorded digest checked
        (samplers.policy.read_tensors, which the learner's load also uses)."""
        from samplers.policy import read_tensors

        for path in sorted(ckpt.rglob("*.safetensors")):
            try:
                read_tensors(path)
            except ValueError as exc:
                rel = path.relative_to(self.local_dir).as_posix()
                raise ValueError(f"{self.location}/{rel}: {str(exc).splitlines()[0]}") from None




class StorageSync(RunLogger):
    """A URI run's outputs uploaded as they are written, as one of the run's loggers: each
    checkpoint (and the records a resume reads) once it is complete; at the summary every file
    of the run (a failed upload fails the run); at close what the other loggers wrote since
    (trackers flush their files when they close: listed before them, this one closes after).

    A run that fails after training began uploads its metrics.jsonl (best effort; a resume
    reads the rows before its checkpoint) and keeps its staging copy; a new run that stops
    before its first iteration leaves nothing behind, here or at its location."""

    def __init__(self, storage: RunStorage, keep: int, new_run: bool) -> None:
        self.storage, self.keep, self.new_run = storage, keep, new_run
        self.trained = self.done = False

    def log_iteration(self, it: int, row: dict[str, Any], info: Any) -> None:
        self.trained = True

    def on_checkpoint(self, path: Path, seconds: float) -> None:
        self.storage.upload_checkpoint(path, self.keep)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.storage.upload_all()
        self.done = True

    def close(self) -> None:
        storage = self.storage
        if not storage.is_uri():
            return
        if self.done:
            storage.upload_all()
            storage.finish(ok=True)
        elif self.trained:
            with contextlib.suppress(OSError):
                storage.upload(["metrics.jsonl"])
            storage.finish(ok=False)
        elif self.new_run:
            storage.discard()
        else:
            storage.finish(ok=True)  # a resume that failed before training: its download is of no use

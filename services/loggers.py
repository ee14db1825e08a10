"""Everything a run writes while it trains goes through one interface, ``RunLogger``.

The driver's loop calls a ``Loggers`` fan-out; its implementations are the run's
metrics.jsonl (always on), the Prometheus /metrics of services/observe.RunMetrics, the
experiment trackers of ``run.loggers`` (TensorBoard, Weights & Biases, MLflow) and the
console (phase lines, the progress bar, the summary table and the run's last line).

Trackers log the same scalars under the same names as metrics.jsonl (a train row's numbers at
step = its iteration; an evaluation's figures — reward, accuracy, diversity, each eval reward,
the watch's statistics and drifts, its seconds — as ``eval/<name>`` at step 0 before training,
at step k for the evaluation between batches after k iterations, and at step ``run.iterations``
after training), the resolved config, each evaluation's samples as an image (``eval/<when>``;
once per 'before' and 'after', and at each step for 'iteration'), and the summary's figures at
the end.

Another output (say, a syncer that uploads a run's files to durable storage) is one more
``RunLogger``: ``on_checkpoint`` is called once a checkpoint is complete on disk, ``close``
once the run ends, whichever way it ends.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from services.checkpoints import write_text_atomic
from services.config import ConfigError, TrainConfig, dump_config
from services.evaluation import Evaluation
from services.observe import RunMetrics, write_prometheus_targets

When = Literal["before", "iteration", "after"]


@dataclass
class IterationInfo:
    """What an iteration's row does not hold: the driver's phase timings (seconds: rollout,
    rollout_duration, update, and sync when weights were published), the iteration's wall time
    and the pipeline's queues and running total of resyncs."""

    times: dict[str, float]
    wall_s: float
    pending_batches: int = 0
    pending_applies: int = 0
    resyncs: int = 0


class RunLogger(Protocol):
    """One output of a run. Every method has a do-nothing default, so an implementation
    writes only what it records."""

    def log_config(self, cfg: TrainConfig, run_dir: Path) -> None:
        """The run is committed (a new directory, or a resumed run's checkpoint loaded)."""

    def log_phase(self, text: str) -> None:
        """A start-up or shut-down step the user waits for ("starting Ray", …)."""

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        """The evaluation before training (a new run only), between batches every ``eval.every``
        iterations (``evaluation.iteration`` trained), or after training."""

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        """Iteration ``it``'s metrics.jsonl row (the learner's statistics and the pipeline's)."""

    def on_checkpoint(self, path: Path, seconds: float) -> None:
        """A checkpoint is complete at ``path`` (written in ``seconds``)."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The run finished; ``summary`` is summary.json's content."""

    def close(self) -> None:
        """The run ended (finished or failed); release what the logger holds."""


class Loggers:
    """The run's loggers in order; each call goes to each of them."""

    def __init__(self, *loggers: RunLogger) -> None:
        self.loggers = list(loggers)

    def add(self, *loggers: RunLogger) -> None:
        # the console stays last, so a run's final line is printed after every other output
        at = next((i for i, x in enumerate(self.loggers) if isinstance(x, ConsoleLogger)), len(self.loggers))
        self.loggers[at:at] = loggers

    def log_config(self, cfg: TrainConfig, run_dir: Path) -> None:
        for x in self.loggers:
            x.log_config(cfg, run_dir)

    def log_phase(self, text: str) -> None:
        for x in self.loggers:
            x.log_phase(text)

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        for x in self.loggers:
            x.log_eval(when, evaluation)

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        for x in self.loggers:
            x.log_iteration(it, row, info)

    def on_checkpoint(self, path: Path, seconds: float) -> None:
        for x in self.loggers:
            x.on_checkpoint(path, seconds)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for x in self.loggers:
            x.log_summary(summary)

    def close(self) -> None:
        """Close every logger, the last added first, even when one fails (the first error is
        raised after): one added before the files' writers (a storage syncer) closes after
        them, so it finds what they flush when they close."""
        error: BaseException | None = None
        for x in reversed(self.loggers):
            try:
                x.close()
            except BaseException as exc:  # noqa: BLE001 - the others still close
                error = error or exc
        if error is not None:
            raise error


# ---- metrics.jsonl --------------------------------------------------------------------------
def eval_row(when: When, evaluation: Evaluation) -> dict[str, Any]:
    """An evaluation's metrics.jsonl row; ``iteration``: the iterations trained before it."""
    return {"kind": "eval", "when": when, "iteration": evaluation.iteration, "version": evaluation.version,
            **evaluation.headline(), **evaluation.figures()}


class JsonlLogger(RunLogger):
    """metrics.jsonl: ``lines`` (a resumed run's rows before its checkpoint; none for a new
    run) written whole at once, then one row per evaluation and iteration, each flushed as
    written (a checkpoint follows its iteration's row, so a resume finds every row before it)."""

    def __init__(self, run_dir: Path, lines: list[str]) -> None:
        self.path = run_dir / "metrics.jsonl"
        write_text_atomic(self.path, "".join(x + "\n" for x in lines))
        self.file = self.path.open("a")

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        self._write(eval_row(when, evaluation))

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        self._write(row)

    def close(self) -> None:
        self.file.close()


# ---- Prometheus -----------------------------------------------------------------------------
class PrometheusLogger(RunLogger):
    """services/observe.RunMetrics (served on ``metrics.port``; a taken port fails here, before
    anything else of the run exists) and the run's Prometheus target file while it trains."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.metrics = RunMetrics(cfg.metrics.port, cfg.metrics.host)
        self.metrics.m["fmrl_eval_watch_factor"].set(cfg.eval.watch_factor)
        self.targets: Path | None = None

    @property
    def port(self) -> int | None:
        return self.metrics.port

    def log_config(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.targets = write_prometheus_targets(run_dir.parent, run_dir.name, cfg.metrics.host, self.port)

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        self.metrics.evaluation(when, evaluation)

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        c = self.cfg
        self.metrics.iteration(it, row, c.rollout.samples_per_prompt * c.rollout.batch_prompts, c.rollout.batch_prompts,
                               c.learner.updates_per_batch, row["lag"], row["dropped_stale"], row["redone_lost"],
                               row["lost_reward"], info.times, info.wall_s, [x.label for x in c.reward.components])
        self.metrics.pipeline(row["sampler_versions"], info.pending_batches, info.pending_applies, info.resyncs)

    def on_checkpoint(self, path: Path, seconds: float) -> None:
        self.metrics.m["fmrl_learner_phase_seconds"].labels(phase="checkpoint").observe(seconds)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.metrics.wait_for_scrape(self.cfg.metrics.final_scrape_timeout_s)

    def close(self) -> None:
        self.metrics.close()
        if self.targets is not None:
            self.targets.unlink(missing_ok=True)


# ---- the console ----------------------------------------------------------------------------
class ConsoleLogger(RunLogger):
    """Phase lines, the progress bar (``run.progress``; opened at the first iteration logged,
    closed by the last evaluation) and the run's last line: where it is and its report."""

    def __init__(self, cfg: TrainConfig, printer: Callable[[str], None] = print) -> None:
        self.total, self.enabled = cfg.run.iterations, cfg.run.progress
        self.print = printer
        self.bar: Any = None

    def log_phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.print(text)

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=it, disable=not self.enabled, desc="train", unit="it",
                            dynamic_ncols=True)
        self.bar.set_postfix(reward=f"{row['reward_mean']:.3f}", v=row["version"])
        self.bar.update(1)

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        if when == "iteration":
            scores = ", ".join(f"{k} {v:.3f}" for k, v in evaluation.scores.items())
            drift = max(evaluation.drift.values(), default=1.0)
            self.log_phase(f"eval after {evaluation.iteration} iterations ({evaluation.seconds:.1f} s): {scores}; "
                           f"diversity {evaluation.diversity:.3f}; largest watch drift {drift:.2f}×")
        if when == "after":
            self._close_bar()

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._close_bar()
        run_dir = str(summary["run_dir"])  # a path or a URI (services/storage.py): no Path(), it folds "//"
        self.print(f"\nrun written to {run_dir} ({summary['seconds']} s); report: {run_dir}/report.html")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


# ---- experiment trackers --------------------------------------------------------------------
# run.loggers name → (the module it needs, the package extra that installs it)
TRACKER_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                  "mlflow": ("mlflow", "mlflow")}


def check_trackers(names: list[str]) -> None:
    """Refuse, in one line naming the extra to install, a tracker whose package is missing
    (called before any directory, cluster or actor exists)."""
    for name in names:
        if name not in TRACKER_EXTRAS:
            continue
        module, extra = TRACKER_EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"run.loggers includes {name}, but the {module} package is not installed: "
                              f"pip install 'fmrl[{extra}]'") from None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row under its own names (its kind, iteration and lists
    left out: the iteration is the step)."""
    out = {}
    for k, v in row.items():
        if k in ("kind", "iteration", "when") or isinstance(v, (str, list, dict)) or v is None:
            continue
        out[k] = float(v)
    return out


def eval_scalars(evaluation: Evaluation) -> dict[str, float]:
    return {f"eval/{k}": float(v) for k, v in evaluation.figures().items() if v is not None}


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's figures, flattened with '/' (before/reward, after/accuracy, seconds …)."""
    out: dict[str, float] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = float(v)

    walk(summary, "")
    return out


def eval_grid(evaluation: Evaluation, columns: int, min_side: int = 64) -> np.ndarray:
    """(H, W, 3) uint8: one row per prompt, its first ``columns`` samples, 1-px gaps; pixels
    repeated so a small image (the 8×8 digits) is at least ``min_side`` px on screen."""
    images = evaluation.images[:, :columns]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    scale = max(1, -(-min_side // images.shape[2]))
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    p, n, h, w, c = images.shape
    grid = np.full((p * (h + 1) - 1, n * (w + 1) - 1, c), 255, np.uint8)
    for i in range(p):
        for j in range(n):
            grid[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = images[i, j]
    return grid


def flat_config(cfg: TrainConfig) -> dict[str, str]:
    """The resolved config as dotted keys (a tracker's parameters), values as text."""
    out: dict[str, str] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v

    walk(cfg.model_dump(mode="json"), "")
    return out


class Tracker(RunLogger):
    """What the three trackers share: the steps of evaluations and the run's tracker ids."""

    ids_file = "trackers.json"

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.run_dir, self.iterations, self.columns = run_dir, cfg.run.iterations, cfg.eval.grid_columns

    def eval_step(self, when: When, evaluation: Evaluation) -> int:
        return {"before": 0, "after": self.iterations}.get(when, evaluation.iteration)

    def run_id(self, name: str, new: Callable[[], str]) -> str:
        """The id this tracker's run has in ``trackers.json`` (a resumed run continues it), or a new one."""
        path = self.run_dir / self.ids_file
        ids = json.loads(path.read_text()) if path.is_file() else {}
        if name not in ids:
            ids[name] = new()
            write_text_atomic(path, json.dumps(ids, indent=1) + "\n")
        return ids[name]


class TensorBoardLogger(Tracker):
    """Event files under <run>/tensorboard (a resumed run adds its own file beside them)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_config(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.writer.add_text("config", "```yaml\n" + dump_config(cfg) + "```", 0)

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, it)

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        step = self.eval_step(when, evaluation)
        for k, v in eval_scalars(evaluation).items():
            self.writer.add_scalar(k, v, step)
        self.writer.add_image(f"eval/{when}", eval_grid(evaluation, self.columns), step, dataformats="HWC")

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2) + "\n```", self.iterations)
        for k, v in summary_scalars(summary).items():
            self.writer.add_scalar(f"summary/{k}", v, self.iterations)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Tracker):
    """A Weights & Biases run whose files are under <run>/wandb. Mode, project and entity are
    wandb's own settings (WANDB_MODE=offline keeps it off the network; ``wandb sync`` uploads
    later); the project defaults to "fmrl", the run's name is the run directory's."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        import wandb

        self.wandb = wandb
        rid = self.run_id("wandb", lambda: secrets.token_hex(4))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fmrl"), dir=str(run_dir), name=run_dir.name,
                              id=rid, resume="allow", config=cfg.model_dump(mode="json"),
                              settings=wandb.Settings(silent=True, console="off"))
        self.finished = False

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        self.run.log(scalars(row), step=it)

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        image = self.wandb.Image(eval_grid(evaluation, self.columns), caption=", ".join(evaluation.prompts))
        self.run.log({**eval_scalars(evaluation), f"eval/{when}": image}, step=self.eval_step(when, evaluation))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in summary_scalars(summary).items()})
        self.finished = True

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.finished else 1)
        # the service process writes the run's log on its own schedule; its teardown flushes
        # it, so the run directory is complete (and can be uploaded) when the run ends
        self.wandb.teardown()


class MlflowLogger(Tracker):
    """An MLflow run in the experiment "fmrl" of MLFLOW_TRACKING_URI where that is set, else of
    a file store under <run>/mlruns (``mlflow ui --backend-store-uri <run>/mlruns``)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow ≥ 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fmrl"))
        eid = exp.experiment_id if exp else self.client.create_experiment(
            os.environ.get("MLFLOW_EXPERIMENT_NAME", "fmrl"))
        self.id = self.run_id("mlflow", lambda: self.client.create_run(eid, run_name=run_dir.name).info.run_id)
        self.status = "FAILED"

    def _log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def log_config(self, cfg: TrainConfig, run_dir: Path) -> None:
        from mlflow.entities import Param

        # parameters are written once (MLflow refuses a changed one): a resumed run's changes
        # are in its config.yaml artifact, written again
        have = self.client.get_run(self.id).data.params
        params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items() if k not in have]
        for i in range(0, len(params), 100):  # log_batch's limit
            self.client.log_batch(self.id, params=params[i:i + 100])
        self.client.log_text(self.id, dump_config(cfg), "config.yaml")

    def log_iteration(self, it: int, row: dict[str, Any], info: IterationInfo) -> None:
        self._log(scalars(row), it)

    def log_eval(self, when: When, evaluation: Evaluation) -> None:
        step = self.eval_step(when, evaluation)
        self._log(eval_scalars(evaluation), step)
        name = f"eval/{when}.png" if when != "iteration" else f"eval/iteration-{step:06d}.png"
        self.client.log_image(self.id, eval_grid(evaluation, self.columns), artifact_file=name)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._log({f"summary/{k}": v for k, v in summary_scalars(summary).items()}, self.iterations)
        self.client.log_dict(self.id, summary, "summary.json")
        self.status = "FINISHED"

    def close(self) -> None:
        self.client.set_terminated(self.id, status=self.status)


TRACKERS: dict[str, Callable[[TrainConfig, Path], RunLogger]] = {
    "tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def open_trackers(cfg: TrainConfig, run_dir: Path) -> list[RunLogger]:
    """The trackers ``run.loggers`` names (jsonl is the driver's own), opened on ``run_dir``;
    those opened are closed again if a later one fails to open."""
    opened: list[RunLogger] = []
    try:
        for name in cfg.run.loggers:
            if name in TRACKERS:
                opened.append(TRACKERS[name](cfg, run_dir))
    except BaseException:
        Loggers(*opened).close()
        raise
    return opened

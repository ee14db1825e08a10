"""Prompt datasets: read, checked, split, and planned into epochs.

A dataset is a file or a local Hugging Face ``datasets`` directory (``rollout.dataset``,
``eval.dataset``): ``.txt`` one prompt a line (blank lines and ``#`` comments skipped),
``.jsonl``/``.json`` objects (pyarrow.json reads JSON Lines; a ``.json`` array goes through
the json module), ``.csv`` (pyarrow.csv), ``.parquet`` (pyarrow.parquet), a directory written
by ``save_to_disk`` (``datasets.load_from_disk``). Each row is a prompt (``prompt_field``)
and its metadata: every other field, JSON values only, handed to the rewards with the
prompt's trajectories. Anything wrong (a missing file, no rows, a row without the prompt,
a non-UTF-8 line, a metadata value that is not JSON) is one :class:`DatasetError` line
naming the file and the line or row, raised when the run starts, before any actor.

Epochs: iteration ``it`` takes ``P = prompts_per_iteration`` distinct rows. Unshuffled, the
rows are cycled in file order (as the inline list is). Shuffled, epoch ``e`` is a permutation
of the N rows drawn from ``(seed, e)`` and lasts ``N // P`` iterations; the ``N mod P`` rows
at its end wait for the next epoch (a different random few each epoch). The cursor (epoch,
position) is a function of ``(seed, iteration)``, so a resumed run plans exactly what the
uninterrupted run would; the checkpoint records it with the dataset's digest, and a resume
refuses a dataset that changed (:func:`check_cursor`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.config import DatasetConfig, TrainConfig
from services.evaluation import seed_for

log = logging.getLogger("fmrl")

SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_METADATA_BYTES = 16 * 1024  # one prompt's metadata as JSON: it rides with every sample to the rewards
MAX_PROMPT_CHARS = 4096


class DatasetError(ValueError):
    """A dataset that cannot be used; one line naming the file and the line or row."""


@dataclass(frozen=True)
class PromptSet:
    """Prompts and their metadata (one JSON object each), in dataset order; ``where`` names the source."""

    prompts: tuple[str, ...]
    metadata: tuple[dict[str, Any], ...]
    where: str

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int] | np.ndarray, where: str | None = None) -> PromptSet:
        return PromptSet(tuple(self.prompts[i] for i in idx), tuple(self.metadata[i] for i in idx),
                         where or self.where)

    def digest(self) -> str:
        """SHA-256 of the prompts and metadata: a resume checks the dataset did not change."""
        text = json.dumps([self.prompts, self.metadata], sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def dataset_format(dc: DatasetConfig) -> str:
    """The format ``dc`` reads: given, or from the path (a directory: hf; else the suffix)."""
    if dc.format != "auto":
        return dc.format
    if dc.path.is_dir():
        return "hf"
    fmt = SUFFIXES.get(dc.path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{dc.path}: cannot tell the format from the suffix {dc.path.suffix!r}; use "
                           f"{', '.join(SUFFIXES)}, a datasets directory, or set format")
    return fmt


def _json_value(value: Any, where: str, key: str) -> Any:  # noqa: ANN401 - any JSON value
    """``value`` as plain JSON (numpy/pyarrow scalars converted), or a DatasetError."""
    if isinstance(value, np.generic):
        value = value.item()
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: metadata field {key!r} is not a JSON value ({exc})") from None
    return json.loads(text)


def _row(record: Any, where: str, field: str) -> tuple[str, dict[str, Any]]:  # noqa: ANN401
    """(prompt, metadata) of one record, checked."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object with a {field!r} field, got {type(record).__name__}")
    if field not in record or record[field] is None:
        present = [str(k) for k, v in record.items() if v is not None]  # pyarrow gives absent fields as null
        raise DatasetError(f"{where}: no {field!r} field (fields: {', '.join(present) or 'none'})")
    prompt = record[field]
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: {field!r} must be text, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise DatasetError(f"{where}: {field!r} is blank")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DatasetError(f"{where}: prompt of {len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
    meta = {str(k): _json_value(v, where, str(k)) for k, v in record.items() if k != field}
    size = len(json.dumps(meta, ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise DatasetError(f"{where}: metadata of {size} bytes as JSON, more than {MAX_METADATA_BYTES}")
    return prompt, meta


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 file; a DatasetError naming the first line that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DatasetError(f"{path} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x})") from None
    return list(enumerate(text.splitlines(), 1))


def _records_txt(path: Path, field: str) -> list[tuple[str, dict[str, Any]]]:
    return [(s, {}) for _, line in text_lines(path) if (s := line.strip()) and not s.startswith("#")]


def _records_jsonl(path: Path, field: str) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.json as pj

    lines = text_lines(path)  # UTF-8 checked with the line named
    try:
        rows = pj.read_json(path).to_pylist()
    except pa.ArrowInvalid:
        # pyarrow names no line and refuses mixed-type fields: find the bad line to name it
        for no, line in lines:
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as exc:
                    raise DatasetError(f"{path} line {no}: not JSON ({exc})") from None
        rows = [json.loads(line) for _, line in lines if line.strip()]  # valid JSON pyarrow cannot type
    numbers = [no for no, line in lines if line.strip()]
    return [_row(r, f"{path} line {no}", field) for no, r in zip(numbers, rows, strict=True)]


def _records_json(path: Path, field: str) -> list[tuple[str, dict[str, Any]]]:
    (_, first), *_ = text_lines(path) or [(0, "")]
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        if first.lstrip().startswith("{"):  # JSON Lines under a .json name
            return _records_jsonl(path, field)
        raise DatasetError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, list):
        raise DatasetError(f"{path}: a .json dataset is an array of objects, got {type(doc).__name__}")
    return [_row(r, f"{path} row {i}", field) for i, r in enumerate(doc)]


def _records_table(path: Path, field: str, fmt: str) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa

    try:
        if fmt == "csv":
            import pyarrow.csv as pc

            text_lines(path)
            table = pc.read_csv(path)
            first = 2  # row 1 is the header
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            first = 0
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: not a {fmt} file ({str(exc).splitlines()[0]})") from None
    if field not in table.column_names:
        raise DatasetError(f"{path}: no {field!r} column (columns: {', '.join(table.column_names)})")
    label = "line" if fmt == "csv" else "row"
    return [_row(r, f"{path} {label} {first + i}", field) for i, r in enumerate(table.to_pylist())]


def _records_hf(path: Path, field: str, split: str | None) -> list[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{path}: reading a datasets directory needs the package datasets "
                           "(pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(f"{path}: not a directory written by datasets' save_to_disk "
                           f"({str(exc).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        name = split or (names[0] if len(names) == 1 else "train")
        if name not in ds:
            raise DatasetError(f"{path}: no split {name!r} (splits: {', '.join(names)}); set split")
        ds, where = ds[name], f"{path} [{name}]"
    elif split is not None:
        raise DatasetError(f"{path} holds one dataset, not splits; split {split!r} does not apply")
    else:
        where = str(path)
    if field not in ds.column_names:
        raise DatasetError(f"{where}: no {field!r} column (columns: {', '.join(ds.column_names)})")
    return [_row(r, f"{where} row {i}", field) for i, r in enumerate(ds.to_list())]


def read_dataset(dc: DatasetConfig) -> PromptSet:
    """Every row of the dataset ``dc`` names, checked; DatasetError (one line) otherwise."""
    path = dc.path
    if not path.exists():
        raise DatasetError(f"prompt dataset not found: {path}")
    fmt = dataset_format(dc)
    if fmt != "hf" and not path.is_file():
        raise DatasetError(f"{path}: a {fmt} dataset is a file")
    if fmt == "txt":
        records = _records_txt(path, dc.prompt_field)
    elif fmt in ("jsonl", "json"):
        records = (_records_jsonl if fmt == "jsonl" else _records_json)(path, dc.prompt_field)
    elif fmt in ("csv", "parquet"):
        records = _records_table(path, dc.prompt_field, fmt)
    else:
        records = _records_hf(path, dc.prompt_field, dc.split)
    where = str(path)
    if dc.split is not None and fmt != "hf":
        records = [(p, m) for p, m in records if m.get("split") == dc.split]
        where = f"{path} [split {dc.split}]"
    if not records:
        raise DatasetError(f"{where}: no prompts" + ("" if dc.split is None or fmt == "hf"
                                                      else f" with split {dc.split!r}"))
    return PromptSet(tuple(p for p, _ in records), tuple(m for _, m in records), where)


@dataclass(frozen=True)
class Prompts:
    """A run's prompts: ``train`` (None: the inline rollout.prompts) and ``eval``."""

    train: PromptSet | None
    eval: PromptSet


_CACHE: dict[tuple, Prompts] = {}


def _stamp(dc: DatasetConfig | None) -> tuple:
    if dc is None:
        return ()
    try:
        st = dc.path.stat()
    except OSError:
        return (str(dc.path),)
    return str(dc.path.resolve()), st.st_mtime_ns, st.st_size


def load_prompts(cfg: TrainConfig) -> Prompts:
    """The run's training and evaluation prompts, read and checked (before any actor starts);
    read again only when the config or a file changed (evaluations ask for them each time)."""
    key = (cfg.rollout.model_dump_json(), cfg.eval.model_dump_json(), cfg.reward.uses("digits_classifier"),
           _stamp(cfg.rollout.dataset), _stamp(cfg.eval.dataset))
    if key not in _CACHE:
        _CACHE.clear()  # one run's prompts at a time
        _CACHE[key] = _load_prompts(cfg)
    return _CACHE[key]


def _load_prompts(cfg: TrainConfig) -> Prompts:
    r, e = cfg.rollout, cfg.eval
    train = read_dataset(r.dataset) if r.dataset is not None else None
    if train is not None and e.split_from_train is not None:
        order = np.random.default_rng(seed_for(r.dataset.seed, 0x5E17)).permutation(len(train))
        k = max(1, round(e.split_from_train * len(train)))
        if k >= len(train):
            raise DatasetError(f"{train.where}: eval.split_from_train={e.split_from_train} of {len(train)} "
                               "prompts leaves none to train on")
        held, train = train.take(sorted(order[:k]), f"{train.where} (eval split)"), train.take(sorted(order[k:]))
    elif e.dataset is not None:
        held = read_dataset(e.dataset)
    elif train is not None:
        seen: dict[str, int] = {}
        for i, p in enumerate(train.prompts):
            seen.setdefault(p, i)
        held = train.take(list(seen.values()))
    else:
        distinct = list(dict.fromkeys(r.prompts))
        held = PromptSet(tuple(distinct), tuple({} for _ in distinct), "rollout.prompts")
    if train is not None and r.prompts_per_iteration is not None and r.prompts_per_iteration > len(train):
        raise DatasetError(f"{train.where}: rollout.prompts_per_iteration={r.prompts_per_iteration} exceeds "
                           f"its {len(train)} prompts")
    if cfg.reward.uses("digits_classifier"):
        from reward_workers.digits import prompt_digit

        for s in (train, held):
            for i, p in enumerate(s.prompts if s is not None else ()):
                try:
                    prompt_digit(p)
                except ValueError as exc:
                    raise DatasetError(f"{s.where} prompt {i}: {exc}") from None
    return Prompts(train, held)


def epoch_order(n: int, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
    """The order of the n rows in ``epoch``: a permutation drawn from (seed, epoch), or 0…n−1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(seed_for(seed, epoch)).permutation(n)


def cursor(n: int, per_it: int, it: int, shuffle: bool) -> tuple[int, int]:
    """(epoch, position in the epoch's order) where iteration ``it`` starts."""
    if not shuffle:  # cycling through file order
        start = it * per_it
        return start // n, start % n
    epoch, k = divmod(it, n // per_it)
    return epoch, k * per_it


def plan_rows(n: int, per_it: int, it: int, shuffle: bool, seed: int) -> list[int]:
    """The ``per_it`` distinct rows of iteration ``it`` (see the module docstring)."""
    epoch, pos = cursor(n, per_it, it, shuffle)
    if not shuffle:
        return [(pos + k) % n for k in range(per_it)]
    return [int(i) for i in epoch_order(n, epoch, shuffle, seed)[pos:pos + per_it]]


def cursor_record(cfg: TrainConfig, prompts: Prompts, next_it: int) -> dict[str, Any] | None:
    """What the checkpoint records of the prompt cursor at ``next_it`` (None: the inline list)."""
    train, dc = prompts.train, cfg.rollout.dataset
    if train is None or dc is None:
        return None
    epoch, pos = cursor(len(train), cfg.rollout.batch_prompts, next_it, dc.shuffle)
    return {"epoch": epoch, "position": pos, "rows": len(train), "digest": train.digest()}


def check_cursor(saved: dict[str, Any] | None, cfg: TrainConfig, prompts: Prompts, next_it: int) -> None:
    """Refuse resuming on a dataset other than the one the checkpoint's run trained on."""
    now = cursor_record(cfg, prompts, next_it)
    if saved is None or now is None:
        if saved != now:
            raise DatasetError("the checkpoint's run and this config differ in rollout.dataset; a resume "
                               "trains on the run's own prompts")
        return
    if saved.get("digest") != now["digest"]:
        raise DatasetError(f"{prompts.train.where if prompts.train else ''}: changed since the checkpoint was "
                           f"written ({saved.get('rows')} rows then, {now['rows']} now); a resume needs the "
                           "run's own prompts")
    if saved != now:
        raise DatasetError(f"the checkpoint's prompt cursor {saved} is not the one iteration {next_it} has ({now})")


def count_truncated(cfg: TrainConfig, prompts: list[str]) -> tuple[int, int] | None:
    """(prompts longer than the text encoder's token limit, that limit), or None where the
    tokenizer cannot be loaded here. Longer prompts are truncated by the encoder; the
    rewards still get the whole prompt."""
    try:
        from transformers import AutoTokenizer

        if cfg.policy.kind == "digits":
            from samplers.text import MAX_TOKENS, minilm_path

            tok, limit = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True), MAX_TOKENS
        else:
            from samplers.sd3 import CLIP_MAX_TOKENS

            tok = AutoTokenizer.from_pretrained(str(cfg.policy.pretrained), subfolder="tokenizer",
                                                local_files_only=True)
            limit = CLIP_MAX_TOKENS
    except Exception as exc:  # noqa: BLE001 - a count for a warning; the run goes on without it
        log.debug("cannot count truncated prompts: %s", exc)
        return None
    distinct = list(dict.fromkeys(prompts))
    lengths = [len(ids) for ids in tok(distinct, truncation=False)["input_ids"]] if distinct else []
    return sum(n > limit for n in lengths), limit


def truncation_note(cfg: TrainConfig, prompts: Prompts) -> str | None:
    """One line for the run's log when some prompts exceed the text encoder's limit."""
    every = [*(prompts.train.prompts if prompts.train else cfg.rollout.prompts), *prompts.eval.prompts]
    counted = count_truncated(cfg, every)
    if counted is None or counted[0] == 0:
        return None
    n, limit = counted
    return (f"warning: {n} of {len(set(every))} distinct prompts exceed the text encoder's {limit} tokens; "
            "the policy sees them truncated to that length (the rewards get them whole)")


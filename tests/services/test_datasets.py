"""Prompt datasets: every format with its metadata, each bad input's one-line error, epochs and
the resume cursor, metadata reaching a reward (in the cluster and over the Redis contract), and
one short run trained from a .jsonl file."""

import json

import numpy as np
import pytest

from reward_workers.base import RewardOutput
from reward_workers.contract import ContractError, decode_request, encode_request, request_digest
from services.config import ConfigError, load_config
from services.datasets import (
    DatasetError,
    check_cursor,
    count_truncated,
    cursor_record,
    load_prompts,
    plan_rows,
    read_dataset,
)
from services.driver import batch_plan, plan_iteration
from services.evaluation import eval_plan
from services.rewards import RewardStage

ROWS = [{"prompt": "a handwritten seven", "digit": 7, "tags": ["thin"]},
        {"prompt": "a handwritten two", "digit": 2, "tags": ["bold", "slanted"]},
        {"prompt": "a handwritten five", "digit": 5, "tags": []}]


def _cfg(path, *sets):
    return load_config(None, [f"rollout.dataset.path={path}", "rollout.prompts_per_iteration=2", *sets])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_format_reads_prompts_and_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    want = [r["prompt"] for r in ROWS]
    (tmp_path / "p.txt").write_text("# digits\n\na handwritten seven\n  a handwritten two  \n# end\na handwritten five\n")
    _jsonl(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    flat = [{"prompt": r["prompt"], "digit": r["digit"]} for r in ROWS]
    pc.write_csv(pa.Table.from_pylist(flat), tmp_path / "p.csv")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    for name, meta in (("p.txt", [{}] * 3), ("p.jsonl", [{k: v for k, v in r.items() if k != "prompt"} for r in ROWS]),
                       ("p.json", None), ("p.csv", [{"digit": r["digit"]} for r in ROWS]), ("p.parquet", None)):
        got = load_prompts(_cfg(tmp_path / name)).train
        assert list(got.prompts) == want, name
        assert list(got.metadata) == (meta or [{"digit": r["digit"], "tags": r["tags"]} for r in ROWS]), name
    # another prompt field, and one file's train/eval rows by its 'split' field
    _jsonl(tmp_path / "s.jsonl", [{"text": r["prompt"], "split": s} for r, s in zip(ROWS, ["train", "eval", "train"], strict=True)])
    cfg = _cfg(tmp_path / "s.jsonl", "rollout.dataset.prompt_field=text", "rollout.dataset.split=train",
               f"eval.dataset.path={tmp_path / 's.jsonl'}", "eval.dataset.prompt_field=text", "eval.dataset.split=eval")
    got = load_prompts(cfg)
    assert got.train.prompts == ("a handwritten seven", "a handwritten five")
    assert got.eval.prompts == ("a handwritten two",) and eval_plan(cfg)[0] == ["a handwritten two"]


def test_a_datasets_directory_reads_its_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(tmp_path / "hf"))
    cfg = _cfg(tmp_path / "hf", f"eval.dataset.path={tmp_path / 'hf'}", "eval.dataset.split=test")
    got = load_prompts(cfg)
    assert got.train.prompts == ("a handwritten seven", "a handwritten two")
    assert got.train.metadata[1] == {"digit": 2, "tags": ["bold", "slanted"]}
    assert got.eval.prompts == ("a handwritten five",)
    with pytest.raises(DatasetError, match=r"hf: no split 'validation' \(splits: train, test\)"):
        read_dataset(_cfg(tmp_path / "hf", "rollout.dataset.split=validation").rollout.dataset)


@pytest.mark.parametrize(("name", "data", "message"), [
    ("missing.jsonl", None, r"prompt dataset not found: .*missing\.jsonl$"),
    ("empty.txt", b"# only a comment\n\n", r"empty\.txt: no prompts$"),
    ("norow.jsonl", b'{"prompt": "a handwritten one"}\n{"caption": "a handwritten two"}\n',
     r"norow\.jsonl line 2: no 'prompt' field \(fields: caption\)$"),
    ("latin.txt", "a handwritten one\na handwritten tw\xf6\n".encode("latin-1"), r"latin\.txt line 2: not UTF-8"),
    ("nan.jsonl", b'{"prompt": "a handwritten one"}\n{"prompt": "a handwritten two", "w": NaN}\n',
     r"nan\.jsonl line 2: metadata field 'w' is not a JSON value"),
    ("broken.jsonl", b'{"prompt": "a handwritten one"}\n{"prompt": \n', r"broken\.jsonl line 2: not JSON"),
    ("nocol.csv", b"caption\na handwritten one\n", r"nocol\.csv: no 'prompt' column \(columns: caption\)$"),
    ("digitless.jsonl", b'{"prompt": "a handwritten one"}\n{"prompt": "a cat"}\n',
     r"digitless\.jsonl prompt 1: prompt 'a cat' must name exactly one digit"),
])
def test_bad_input_is_one_line_naming_file_and_row(tmp_path, name, data, message):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DatasetError, match=message) as err:
        load_prompts(_cfg(tmp_path / name))
    assert "\n" not in str(err.value)


def test_config_refuses_conflicting_sources():
    with pytest.raises(ConfigError, match="rollout.prompts or rollout.dataset, not both"):
        load_config(None, ["rollout.dataset.path=x.jsonl", "rollout.prompts=[a handwritten one]",
                           "rollout.prompts_per_iteration=2"])
    with pytest.raises(ConfigError, match="needs rollout.prompts_per_iteration"):
        load_config(None, ["rollout.dataset.path=x.jsonl"])
    with pytest.raises(ConfigError, match="eval.split_from_train splits rollout.dataset"):
        load_config(None, ["eval.split_from_train=0.1"])


def test_long_prompts_are_counted_for_the_truncation_warning(tmp_path):
    cfg = load_config(None, [])
    long = "a handwritten seven " + "drawn very carefully with a thin black pen " * 3
    assert count_truncated(cfg, ["a handwritten seven", long, long]) == (1, 16)  # MiniLM's 16 tokens (samplers/text.py)


def test_epochs_shuffle_and_the_resume_cursor(tmp_path):
    rows = [{"prompt": f"a handwritten {w}", "i": i} for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path, "rollout.prompts_per_iteration=5", "rollout.dataset.seed=3")
    prompts = load_prompts(cfg)
    epochs = [sorted(i for it in (2 * e, 2 * e + 1) for i in plan_rows(10, 5, it, True, 3)) for e in range(3)]
    assert epochs == [list(range(10))] * 3  # each epoch: every row once
    orders = [plan_rows(10, 5, 2 * e, True, 3) for e in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # shuffled anew each epoch
    assert plan_rows(10, 5, 3, False, 3) == [5, 6, 7, 8, 9]  # unshuffled: file order, cycling
    # 10 rows, 3 a batch: an epoch is 3 iterations of distinct rows; the row left over waits
    for it in range(12):
        assert len(set(plan_rows(10, 3, it, True, 0))) == 3
    # metadata rides with its prompt
    chosen, seeds, meta = plan_iteration(cfg, 7, prompts)
    assert [f"a handwritten {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][m['i']]}"
            for m in meta] == chosen and (chosen, seeds) == batch_plan(cfg, 7)
    # resume at k: the plan of k.. (dataset read again, as a resumed process does) is the uninterrupted one
    k = 3
    uninterrupted = [plan_iteration(cfg, it, prompts) for it in range(8)]
    saved = json.loads(json.dumps(cursor_record(cfg, prompts, k)))  # what driver.json holds
    assert saved["epoch"] == 1 and saved["position"] == 5
    resumed_cfg = load_config(None, [f"rollout.dataset.path={path}", "rollout.prompts_per_iteration=5",
                                     "rollout.dataset.seed=3"])
    again = load_prompts(resumed_cfg.model_copy(deep=True))
    check_cursor(saved, resumed_cfg, again, k)
    assert [plan_iteration(resumed_cfg, it, again) for it in range(k, 8)] == uninterrupted[k:]
    _jsonl(path, rows[:-1] + [{"prompt": "a handwritten nine", "i": 99}])  # the file changed
    with pytest.raises(DatasetError, match=r"d\.jsonl: changed since the checkpoint was written"):
        check_cursor(saved, resumed_cfg, load_prompts(resumed_cfg), k)


def test_eval_prompts_come_from_eval_dataset_or_a_seeded_split(tmp_path):
    rows = [{"prompt": f"a handwritten {w}", "i": i} for i, w in enumerate(["zero", "one", "two", "three", "four"])]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    ev = _jsonl(tmp_path / "e.jsonl", [{"prompt": "the digit 7 written by hand", "digit": 7}])
    assert eval_plan(_cfg(train, f"eval.dataset.path={ev}"))[0] == ["the digit 7 written by hand"]
    split = load_prompts(_cfg(train, "eval.split_from_train=0.4"))
    assert len(split.eval) == 2 and len(split.train) == 3
    assert set(split.eval.prompts).isdisjoint(split.train.prompts)
    assert load_prompts(_cfg(train, "eval.split_from_train=0.4")).eval == split.eval  # seeded
    assert eval_plan(_cfg(train))[0] == [r["prompt"] for r in rows]  # default: the training prompts


def test_shipped_digits_sets_parse_and_differ():
    train = read_dataset(load_config(None, ["rollout.dataset.path=configs/datasets/digits_train.jsonl",
                                            "rollout.prompts_per_iteration=2"]).rollout.dataset)
    ev = read_dataset(load_config(None, ["rollout.dataset.path=configs/datasets/digits_eval.jsonl",
                                         "rollout.prompts_per_iteration=2"]).rollout.dataset)
    from reward_workers.digits import prompt_digit

    assert all(prompt_digit(p) == m["digit"] for s in (train, ev) for p, m in zip(s.prompts, s.metadata, strict=True))
    assert not set(train.prompts) & set(ev.prompts)


class Recorder:
    """A reward that records what it was handed."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, metadata=None):
        self.calls.append((list(prompts), metadata))
        return RewardOutput(scores=np.zeros(len(prompts)))


def test_metadata_reaches_an_in_cluster_reward():
    cfg = load_config(None, ["reward.components=[{kind: jpeg_compressibility, weight: 1.0}]"])
    stage = RewardStage(cfg.reward)
    rec = Recorder()
    stage.components = [(stage.components[0][0], rec)]
    images = np.zeros((2, 8, 8, 1), np.uint8)
    meta = [{"digit": 7, "tags": ["thin"]}, {"digit": 2}]
    stage.score(images, ["a handwritten seven", "a handwritten two"], meta)
    stage.score(images, ["a handwritten seven", "a handwritten two"])
    assert rec.calls == [(["a handwritten seven", "a handwritten two"], meta),
                         (["a handwritten seven", "a handwritten two"], None)]
    with pytest.raises(ValueError, match="2 prompts but 1 metadata"):
        stage.score(images, ["a", "b"], meta[:1])
    stage.close()


def test_metadata_crosses_the_redis_contract():
    images = np.zeros((2, 8, 8, 1), np.uint8)
    meta = [{"digit": 7, "objects": [{"name": "cat", "count": 2}]}, {"digit": 2}]
    kw = {"reward": "r", "request_id": "id1", "reply_to": "q", "encoding": "raw"}
    request, fields = encode_request(images, ["p", "q"], metadata=meta, **kw)
    got, _ = decode_request(fields, reward="r")
    assert got.metadata == meta
    plain, plain_fields = encode_request(images, ["p", "q"], **kw)
    assert decode_request(plain_fields, reward="r")[0].metadata is None
    assert request_digest(request, fields["images"]) != request_digest(plain, plain_fields["images"])
    with pytest.raises(ContractError, match="2 prompts but 1 metadata"):
        encode_request(images, ["p", "q"], metadata=meta[:1], **kw)
    with pytest.raises(ContractError, match="metadata 1 is not JSON"):
        encode_request(images, ["p", "q"], metadata=[{}, {"x": float("nan")}], **kw)
    with pytest.raises(ContractError, match="metadata 0 takes .* bytes as JSON, more than the limit") as err:
        encode_request(images, ["p", "q"], metadata=[{"x": "y" * 20000}, {}], **kw)
    assert err.value.reason == "too_large"
    # a service refuses the same, whoever wrote the entry
    doc = json.loads(fields["meta"])
    doc["metadata"] = [{"x": 1}]
    with pytest.raises(ContractError, match="2 prompts but 1 metadata") as err:
        decode_request({**fields, "meta": json.dumps(doc).encode()}, reward="r")
    assert err.value.reason == "prompt_count"

"""Configs by name: the shipped ones resolve from any directory (`--config digits_ac_flow`),
a path is read as given, and anything else is one line naming what ships."""

from pathlib import Path

import pytest
import yaml

from services.cli import main
from services.config import ConfigError, load_config, resolve_config, shipped_configs

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_are_the_checkouts() -> None:
    shipped = shipped_configs()
    assert set(shipped) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert {"digits_ac_flow", "sd3_tiny_cpu"} <= set(shipped)
    assert all(p.is_file() and p.suffix == ".yaml" for p in shipped.values())


def test_a_name_resolves_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_checkout = load_config(ROOT / "configs/digits_orw.yaml")
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert load_config("digits_orw") == from_checkout
    assert load_config("digits_orw.yaml") == from_checkout
    assert load_config("digits_orw", ["learner.lr=0.5"]).learner.lr == 0.5
    assert resolve_config("sd3_tiny_cpu").read_bytes() == (ROOT / "configs/sd3_tiny_cpu.yaml").read_bytes()


def test_an_existing_path_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("digits_orw.yaml").write_text("run: {iterations: 3}\n")
    assert load_config("digits_orw.yaml").run.iterations == 3  # the file here, as given
    assert load_config("digits_orw") == load_config(ROOT / "configs/digits_orw.yaml")  # no such file: the name
    mine = tmp_path / "sub" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("run: {iterations: 4}\n")
    assert load_config(mine).run.iterations == 4 and load_config("sub/mine.yaml").run.iterations == 4


@pytest.mark.parametrize("given", ["nope", "nope.yaml", "configs/digits_orw.yaml", "digits_orw.yml", "/abs/digits_orw"])
def test_neither_a_file_nor_a_name_lists_the_shipped_names(given: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_config(given)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"config file not found: {given}, nor a shipped config of that name (shipped: ")
    assert all(name in message for name in shipped_configs())


def test_cli_takes_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--config", "sd3_tiny_cpu"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["policy"]["kind"] == "sd3"
    assert main(["config", "--config", "sd3_tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config file not found: sd3_tiny" in err and "sd3_tiny_cpu" in err

"""deploy/'s Prometheus files pass promtool: the scrape config, the alert rules, and the rules'
unit tests (deploy/prometheus-alerts.test.yml); and promtool does refuse a broken rule."""

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# what `check config` may warn about: the discovery files are absent until a Ray head or a
# run writes them
FILE_SD = ("/tmp/ray/prom_metrics_service_discovery.json", "runs/prometheus/*.json")


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed; `make test` installs it (apt-get install -y prometheus)",
                    pytrace=False)
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited {proc.returncode}:\n{out}"
    return out


def test_scrape_config_is_valid_and_its_rule_files_load():
    out = _ok(promtool("check", "config", "prometheus.yml"))
    assert "rule files found" in out, out
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert all(any(f in line for f in FILE_SD) for line in warnings), out


def test_alert_rules_are_valid():
    out = _ok(promtool("check", "rules", "prometheus-alerts.yml"))
    assert "SUCCESS" in out, out


def test_alert_rules_pass_their_unit_tests():
    out = _ok(promtool("test", "rules", "prometheus-alerts.test.yml"))
    assert "SUCCESS" in out, out


def test_a_broken_rule_is_refused(tmp_path):
    good = (DEPLOY / "prometheus-alerts.yml").read_text()
    broken = good.replace("expr: fmrl_batch_diversity < 0.5 * fmrl_batch_diversity_reference",
                          "expr: fmrl_batch_diversity <")
    assert broken != good, "the collapse rule's expression changed; update this test"
    (tmp_path / "alerts.yml").write_text(broken)
    proc = promtool("check", "rules", "alerts.yml", cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "parse error" in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr

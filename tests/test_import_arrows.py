"""The import arrows of ARCHITECTURE.md, read from the source.

    learner → samplers;  services → all;  fmrl (the Python API) → all;  reward_workers → nothing of ours;
    samplers → nothing of ours;  objectives → torch and the standard library only.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"samplers", "learner", "services", "reward_workers", "telemetry", "fmrl"}
# telemetry (the metric declarations) is a leaf every package may use; fmrl (the Python API)
# sits on top: it may use everything, and nothing of ours uses it
ALLOWED = {"samplers": {"telemetry"}, "reward_workers": {"telemetry"}, "learner": {"samplers", "telemetry"},
           "services": OURS - {"fmrl"}, "telemetry": set(), "fmrl": OURS}
OBJECTIVE_FORBIDDEN = {"ray", "redis", "diffusers", "transformers", "samplers", "services", "reward_workers", "pydantic"}


def imported_roots(source: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def violations(package: str, relpath: str, source: str) -> list[str]:
    roots = imported_roots(source)
    bad = [f"{relpath} imports {r}" for r in sorted((roots & OURS) - ALLOWED[package] - {package})]
    if "/objectives/" in relpath:
        bad += [f"{relpath} (an objective) imports {r}" for r in sorted(roots & OBJECTIVE_FORBIDDEN)]
    return bad


def test_checker_catches_a_wrong_arrow():
    assert violations("samplers", "samplers/x.py", "from learner.learner import Learner") == [
        "samplers/x.py imports learner"]
    assert violations("reward_workers", "reward_workers/x.py", "import samplers.flow") != []
    assert violations("learner", "learner/objectives/x.py", "import ray\nimport torch") == [
        "learner/objectives/x.py (an objective) imports ray"]
    assert violations("learner", "learner/x.py", "from samplers import flow") == []


def test_repository_follows_the_arrows():
    bad = []
    for package in ALLOWED:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"package {package} has no Python files"
        for f in files:
            bad += violations(package, str(f.relative_to(ROOT)), f.read_text())
    assert not bad, "imports against ARCHITECTURE.md:\n" + "\n".join(bad)

"""The package as a user installs it: a wheel holding the configs (found by name, with no
checkout on sys.path), ``import fmrl`` as the Python API, the licence, and the container image
that the cluster files name (a static check: no docker here)."""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # as text: the TOML reader is 3.11+, the project 3.10+
VERSION = re.search(r'^version = "([^"]+)"$', PYPROJECT, re.M).group(1)
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def _checkout_copy(dest: Path) -> Path:
    """The files a clone has (tracked, plus new ones git does not ignore), copied to ``dest``:
    the wheel is built there, so no build/ or egg-info lands in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        f = ROOT / name
        if f.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline with this venv's setuptools (no build isolation, no index)."""
    if shutil.which("git") is None:
        pytest.skip("git lists the files of the checkout")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _checkout_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("fmrl-*.whl")
    return built


def test_wheel_ships_configs_api_and_licence(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert SHIPPED and {f"configs/{n}" for n in SHIPPED} <= names
    assert {"configs/__init__.py", "fmrl/__init__.py", "fmrl/py.typed", "services/cli.py"} <= names
    assert "samplers/assets/digits_policy.safetensors" in names or any(n.startswith("samplers/assets/") for n in names)
    dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{dist}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert not any(n.startswith(("tests/", "deploy/", "benchmarks/")) for n in names)


def test_installed_wheel_resolves_a_config_by_name_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """The wheel unpacked as pip installs a pure-Python wheel, run with ``python -S`` (no site:
    the editable install's finder that maps the checkout is not loaded) from a directory with
    no configs/: `fmrl config --config sd3_tiny_cpu` reads the installed package data."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    deps = sysconfig.get_paths()["purelib"]  # this venv's dependencies (torch, pydantic, ...)
    probe = (
        "import json, sys\n"
        "from services.cli import main\n"
        "import configs, fmrl, services\n"
        "print(json.dumps({'configs': configs.__file__, 'services': services.__file__,\n"
        "                  'version': fmrl.__version__}))\n"
        "sys.stdout.flush()\n"
        "sys.exit(main(['config', '--config', 'sd3_tiny_cpu']))\n")
    env = {"PYTHONPATH": f"{site}:{deps}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    first, rest = run.stdout.split("\n", 1)
    where = json.loads(first)
    assert where["configs"].startswith(str(site)) and where["services"].startswith(str(site)), where
    assert where["version"] == VERSION
    printed = yaml.safe_load(rest)
    assert printed["policy"]["kind"] == "sd3"
    from services.config import dump_config, load_config

    assert printed == yaml.safe_load(dump_config(load_config(ROOT / "configs/sd3_tiny_cpu.yaml")))


def test_import_fmrl_is_light() -> None:
    probe = (
        "import sys, fmrl\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers', 'services') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(fmrl.__version__)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == VERSION


def test_import_fmrl_exposes_the_api() -> None:
    import fmrl
    from services.config import TrainConfig, load_config
    from services.driver import train
    from services.eval_cmd import evaluate_checkpoint

    assert set(fmrl.__all__) >= {"train", "TrainConfig", "load_config", "evaluate", "__version__"}
    assert set(fmrl.__all__) <= set(dir(fmrl))
    assert (fmrl.TrainConfig, fmrl.load_config, fmrl.train, fmrl.evaluate) == (
        TrainConfig, load_config, train, evaluate_checkpoint)
    assert fmrl.load_config("digits_orw") == load_config(ROOT / "configs/digits_orw.yaml")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fmrl.nope  # noqa: B018


def test_licence_and_spdx_metadata() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190
    assert re.search(r'^license = "Apache-2.0"$', PYPROJECT, re.M)  # SPDX (PEP 639)
    assert re.search(r'^license-files = \["LICENSE"\]$', PYPROJECT, re.M)
    assert "License ::" not in PYPROJECT  # PEP 639: no licence classifier beside the expression
    assert int(re.search(r'requires = \["setuptools>=(\d+)', PYPROJECT).group(1)) >= 77  # PEP 639 support


def _images(node: object) -> list[str]:
    """Every ``image:`` value in a YAML tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_dockerfile_builds_the_image_the_cluster_files_run() -> None:
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    job = yaml.safe_load((ROOT / "deploy/kuberay-rayjob.yaml").read_text())
    launcher = yaml.safe_load((ROOT / "deploy/ray-cluster.yaml").read_text())
    images = set(_images(job)) | {launcher["docker"]["image"]}
    assert len(images) == 1, images
    (image,) = images
    # the image the Dockerfile's own build line tags, and the README's
    assert re.search(rf"docker build -f deploy/Dockerfile -t {re.escape(image)} \.", dockerfile)
    assert f"docker build -f deploy/Dockerfile -t {image} ." in (ROOT / "README.md").read_text()

    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("rayproject/ray:") and base.endswith(args["CUDA"])  # Ray's CUDA image
    ray_version = job["spec"]["rayClusterSpec"]["rayVersion"]
    # the tag names what the image holds: the project's version, Ray, Python, CUDA
    assert image.endswith(f":{VERSION}-ray{ray_version}-{args['PYTHON']}-{args['CUDA']}"), image
    assert base == f"rayproject/ray:{ray_version}-{args['PYTHON']}-{args['CUDA']}"

    # CUDA torch from the PyTorch index first, then the project (copied in) installed
    runs = re.findall(r"^RUN (.+?)(?<!\\)$", dockerfile, re.M | re.S)
    torch_at = next(i for i, r in enumerate(runs) if "download.pytorch.org/whl/${CUDA}" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install [^\n]*/app\b", r))
    assert torch_at < project_at
    assert re.search(r"^COPY (--\S+ )*\. /app$", dockerfile, re.M)
    # the RayJob reads its config from that copy
    assert job["spec"]["entrypoint"].split()[3].startswith("/app/configs/")
    ignore = (ROOT / "deploy/Dockerfile.dockerignore").read_text().split()
    assert {".git/", ".venv/", "runs/"} <= set(ignore)

"""The installed wheel works outside the repository: built from the checkout's files, installed into a folder of its
own, and run from a working directory that has no configs/ or tools/: ``python -m internevo_jax``, the console
scripts, configs by name (their ``configs._base_`` imports included), ``__version__`` and the license metadata."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# What the wheel is built from: the files pyproject.toml names, copied, so no build/ or *.egg-info lands in the
# checkout and no stale build/lib copy of a deleted module slips into the wheel.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "internevo_jax", "configs", "tools")
# Where each source tree lands in the wheel (pyproject's package-dir mapping).
SHIPPED_AS = {"internevo_jax": "internevo_jax", "configs": "internevo_jax/configs", "tools": "internevo_jax/tools"}


class Installed:
    def __init__(self, wheel: Path, site: Path, cwd: Path):
        self.wheel, self.site, self.cwd = wheel, site, cwd

    def run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        """Runs ``args`` from a folder outside the repository, with only the installed copy importable."""
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}  # one CPU device
        env["PYTHONPATH"] = str(self.site)
        return subprocess.run(args, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout)

    def script(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return self.run(str(self.site / "bin" / name), *args)


def copy_sources(dst: Path) -> Path:
    dst.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    src = copy_sources(tmp / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline, with the venv's setuptools (>= 70 builds wheels without the `wheel` package).
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)]
    out = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp / "dist").glob("internevo_jax-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)]
    out = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    cwd = tmp / "work"
    cwd.mkdir()
    assert ROOT not in cwd.parents and not (cwd / "configs").exists()
    return Installed(wheel, tmp / "site", cwd)


def test_wheel_holds_the_trees_license_and_scripts(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {
        f"{SHIPPED_AS[tree]}/{path.relative_to(ROOT / tree).as_posix()}"
        for tree in SHIPPED_AS
        for path in (ROOT / tree).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert "internevo_jax/configs/_base_/models/internlm2_1_8b.py" in expected
    assert not expected - names, f"missing from the wheel (add the package to pyproject.toml): {expected - names}"
    info = f"internevo_jax-{VERSION}.dist-info"
    wheel = zipfile.ZipFile(installed.wheel)
    assert wheel.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not [line for line in core if "safetensors" in line], core
    assert 'Requires-Dist: jax[cuda12]; extra == "cuda12"' in metadata
    scripts = wheel.read(f"{info}/entry_points.txt").decode()
    assert "internevo_jax/serving/static/index.html" in names  # the chat page (package data)
    for name in ("internevo-train", "internevo-convert", "internevo-generate", "internevo-serve"):
        assert name in scripts and (installed.site / "bin" / name).is_file()


def test_the_installed_copy_is_imported_with_its_version(installed):
    code = (
        "import json, sys, internevo_jax\n"
        "from internevo_jax import cli, config\n"
        "cli._tool_main('convert_checkpoint')\n"  # no tool puts the package folder on sys.path
        "print(json.dumps([internevo_jax.__file__, internevo_jax.__version__, str(config.shipped_configs()),"
        " [p for p in sys.path if p.rstrip('/').endswith('internevo_jax')]]))"
    )
    out = installed.run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    file, version, configs, stray = json.loads(out.stdout)
    assert Path(file).is_relative_to(installed.site) and not Path(file).is_relative_to(ROOT)
    assert version == VERSION
    assert Path(configs) == installed.site / "internevo_jax" / "configs"
    assert stray == []


def test_configs_by_name_and_python_m(installed):
    out = installed.run(sys.executable, "-m", "internevo_jax", "--config=tiny", "--print_config")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["JOB_NAME"] == "tiny"
    out = installed.script("internevo-train", "--config=demo", "--print_config")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["JOB_NAME"] == "demo"
    # The packaged copy's `with read_base(): from configs._base_.models...` finds internevo_jax/configs/_base_.
    out = installed.script("internevo-train", "--config=internlm2_1_8b.py", "--print_config")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"]["hidden_size"] == 2048
    out = installed.script("internevo-train", "--config=no_such_config")
    assert out.returncode == 2 and "no_such_config does not exist" in out.stderr
    assert "demo, demo_text" in out.stderr and "Traceback" not in out.stderr
    out = installed.script("internevo-train", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"internevo_jax {VERSION}"


def test_a_file_path_wins_over_a_shipped_name(installed):
    (installed.cwd / "demo").write_text(
        "JOB_NAME = 'mine'\ndata = dict(seq_len=8, micro_bsz=1)\nckpt = dict(enable_save_ckpt=False)\n"
    )
    try:
        out = installed.script("internevo-train", "--config=demo", "--print_config")
    finally:
        (installed.cwd / "demo").unlink()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["JOB_NAME"] == "mine"


@pytest.mark.parametrize("script", ["internevo-convert", "internevo-generate", "internevo-serve"])
def test_tool_scripts(installed, script):
    out = installed.script(script, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script}")


def test_installed_wheel_trains(installed):
    out = installed.script("internevo-train", "--config=tiny", "--config.data.total_steps=2", "--launcher=local")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: 2 steps" in out.stdout + out.stderr
    assert (installed.cwd / "RUN" / "tiny").is_dir()


def test_editable_install_runs_the_tools(tmp_path):
    """``pip install -e .`` (the README's install) maps ``internevo_jax.tools`` to the checkout's tools/, which takes
    a regular package there (tools/__init__.py): the console scripts work from any folder."""
    src = copy_sources(tmp_path / "src")
    venv.create(tmp_path / "venv", with_pip=False)
    (site,) = (tmp_path / "venv" / "lib").glob("python3*/site-packages")
    # The test environment's packages, less its own internevo_jax (so pip neither sees nor touches that install).
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("internevo_jax", "__editable__")):
            (deps / entry.name).symlink_to(entry)
    (site / "deps.pth").write_text(f"{deps}\n")
    python = tmp_path / "venv" / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--no-index"]
    out = subprocess.run([*pip, "--no-build-isolation", "-e", str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    bin_dir = tmp_path / "venv" / "bin"
    for script in ("internevo-convert", "internevo-generate"):
        out = subprocess.run([str(bin_dir / script), "--help"], cwd=cwd, env=env, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {script}"), out.stderr[-2000:]
    code = "import internevo_jax.tools.generate as g, internevo_jax.config as c; print(g.__file__, c.shipped_configs())"
    out = subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(src / "tools" / "generate.py"), str(src / "configs")]

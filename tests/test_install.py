"""The package works installed without -e: the model configs ship inside it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE_CONFIGS = REPO / "configs" / "model"
PACKAGED_CONFIGS = REPO / "dptrain" / "assets" / "model"


def yaml_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.yaml"))}


def test_packaged_model_configs_equal_the_repositorys():
    """configs/model is the copy users read; dptrain/assets/model the one installed. Edit both."""
    source, packaged = yaml_files(SOURCE_CONFIGS), yaml_files(PACKAGED_CONFIGS)
    assert source, "no model configs in configs/model"
    assert sorted(source) == sorted(packaged), "copy configs/model/*.yaml to dptrain/assets/model/"
    changed = [name for name in source if source[name] != packaged[name]]
    assert not changed, f"differ between configs/model and dptrain/assets/model: {changed}"


def copy_sources(dest: Path) -> Path:
    """What a source distribution holds: the package, pyproject.toml and the readme (no configs/)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "dptrain", dest / "dptrain",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.slow
def test_plan_writes_a_config_from_a_non_editable_install(tmp_path):
    # A venv seeing this interpreter's packages (torch and the rest are not downloaded), without a
    # pip of its own: this interpreter's pip installs into it, building with its setuptools.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    python = venv / "bin" / "python"
    sources = copy_sources(tmp_path / "src")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(sources)], check=True, env=env)
    shutil.rmtree(sources)  # the install must not need its source tree
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import dptrain; print(dptrain.__file__)"], cwd=work,
                           check=True, capture_output=True, text=True, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this checkout
    result = subprocess.run(
        [str(venv / "bin" / "dptrain"), "plan", "--compute", "1e16", "--epsilon", "8", "--delta", "1e-7",
         "--data-size", "1000000", "--seq-len", "256", "--allow-extrapolation",
         "--write-config", "train.yaml", "--data-path", "data"],
        cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load((work / "train.yaml").read_text())
    model = (work / written["model"]).resolve()
    assert model.is_relative_to(venv.resolve()) and model.is_file(), model
    assert model.read_bytes() == (SOURCE_CONFIGS / model.name).read_bytes()

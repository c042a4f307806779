"""A real wheel install (not editable) carries what bigtrain needs at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_install_ships_the_deepspeed_configs(tmp_path):
    """Issue 11.11: `pip install .` shipped without ds_configs/, which engine.py looked for beside the
    package. Build a wheel from a copy of the sources, install it into an empty target and resolve a
    shipped config from there, with no source checkout importable."""
    src = tmp_path / "src"
    for name in ("bigtrain", "ds_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src), "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("bigtrain-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    code = ("import bigtrain.engine as e; from bigtrain.config import load_config; print(e.__file__); "
            "print(e.ds_config_path('zero3')); print(e.resolve_ds_config(load_config(None, []), 2)['zero_optimization']['stage'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    module, zero3, stage = out.stdout.split()
    assert module.startswith(str(site)) and zero3.startswith(str(site)), out.stdout
    assert stage == "2"

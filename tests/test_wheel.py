"""The package as a user installs it: sdist -> wheel -> a plain (not editable) install, used from
outside the checkout. The bundled sample corpus and tokenizer must travel as package data."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Offline and quiet: pip must not look for an index or for its own new version.
PIP_ENV = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(args, cwd, env=PIP_ENV):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """smolctl built the way `python -m build` does (an sdist, then a wheel from the unpacked
    sdist) and installed with pip into a target directory. Built from a copy of the sources, so
    the checkout gets no build/ or egg-info and no stale build/lib can leak into the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "smolctl", src / "smolctl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run(["-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp / 'sdist')!r})"], src)
    (sdist,) = (tmp / "sdist").glob("smolctl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
        tar.extractall(tmp / "unpacked", filter="data")
    for name in ("sample/train.parquet", "sample/heldout.parquet", "tokenizer/tokenizer.json"):
        assert any(m.endswith(f"/smolctl/assets/{name}") for m in members), name
    (unpacked,) = (tmp / "unpacked").iterdir()
    run(["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", unpacked], tmp)
    (wheel,) = (tmp / "dist").glob("smolctl-*.whl")
    assert wheel.stat().st_size < 16 * 2**20  # a small install: tokenizer and corpus compressed
    run(["-m", "pip", "install", "-q", "--no-deps", "--target", tmp / "site", wheel], tmp)
    return tmp / "site"


def test_installed_wheel_trains_and_evaluates_on_the_bundled_sample(site, tmp_path):
    env = {**PIP_ENV, "PYTHONPATH": str(site)}  # the installed copy only: the checkout is not on the path
    where = run(["-c", "import smolctl, smolctl.data as d; print(smolctl.__file__); print(d.SAMPLE_DIR)"],
                tmp_path, env).split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    sample = site / "smolctl" / "assets" / "sample"

    out = run(["-m", "smolctl", "train", "--preset", "tiny", "--data", "sample", "--max-steps", 2, "--batch-size", 2,
               "--seq-len", 32, "--eval-tokens", 64, "--run-dir", "run", "--no-dashboard"], tmp_path, env)
    assert f"on {sample / 'train.parquet'}," in out
    assert (tmp_path / "run" / "checkpoints" / "final").is_dir()

    out = run(["-m", "smolctl", "eval", "--model", "run", "--seq-len", 32, "--tokens", 256], tmp_path, env)
    assert f"scored 256 tokens of {sample / 'heldout.parquet'}" in out  # the default data: the bundled held-out split

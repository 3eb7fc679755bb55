"""The built wheel works on its own: installed into a fresh virtual environment outside the
checkout, ``netid compare`` and a short ``netid demo`` run from another folder with the
models, operating points and demo sample the wheel carries.

The fresh environment gets only the wheel (``--no-deps``); its dependencies are borrowed
from the test's own environment by a ``.pth`` line, so the test needs no network beyond
what building the wheel does. The checkout is never on its path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _copy_source(dest: Path) -> Path:
    """The files a wheel is built from, copied so that the build leaves the checkout alone."""
    src = dest / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "out", ".pytest_cache")
    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its ``bin`` folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp)
    wheels = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(wheels)],
                   check=True, timeout=600)
    (wheel,) = wheels.glob("netid_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "engine/assets_models/campplus.onnx" in names and "engine/assets_samples/identities.json" in names
    assert not any(n.startswith("benchmarks/") for n in names), "a top-level benchmarks package"
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    py = bin_dir / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=600)
    # the dependencies, from this environment: a path line, after the venv's own site-packages
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bin_dir


def _run(bin_dir: Path, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(bin_dir / "netid"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c", "import engine; print(engine.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(REPO) not in where, where

    lfw = REPO / "samples" / "lfw"
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(f"{lfw / 'Al_Gore/Al_Gore_0001.jpg'}\t{lfw / 'Al_Gore/Al_Gore_0003.jpg'}\n"
                     f"{lfw / 'Al_Gore/Al_Gore_0001.jpg'}\t{lfw / 'Laura_Bush/Laura_Bush_0001.jpg'}\n")
    out = _run(installed, "compare", "face", "--pairs", str(pairs), "--target-fmr", "1e-3", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    same, other = (json.loads(ln) for ln in out.stdout.strip().splitlines()[-2:])
    assert same["decision"] == "match" and other["decision"] == "no_match", (same, other)


def test_a_short_demo_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = _run(installed, "demo", "--voices", "speech", "--residents", "3", "--rounds", "1",
               "--workdir", str(tmp_path / "work"), cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = next(ln for ln in out.stdout.splitlines() if ln.startswith("SUMMARY"))
    assert "genuine passed" in summary, summary

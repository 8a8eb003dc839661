"""However prefixflow is installed, it gets its C++ kernels; without a compiler, one line.

The install is `pip install` with build isolation on, as `pip install git+URL` does it: no
torch in the build, so the kernels must come from the sources shipped in the package,
compiled where it runs. They land in the same cache folder as this checkout's, so the
test takes seconds once `make setup` has built them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefixflow import kernel_build

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

CHECK_KERNELS = """
import json, torch, prefixflow
from prefixflow import native
x = torch.randn(4, 16)
out = torch.ops.prefixflow.silu_and_mul(x) if native.available() else None
want = torch.nn.functional.silu(x[:, :8]) * x[:, 8:]
print(json.dumps({
    "file": prefixflow.__file__,
    "available": native.available(),
    "folder": str(native.state().folder),
    "op_matches": out is not None and torch.allclose(out, want, atol=1e-5),
}))
"""

CHECK_FALLBACK = """
import logging
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
from prefixflow import native
from prefixflow.attention import kernels
print(native.available(), kernels.load() is None, native.state().status)
"""


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    unset = ("PREFIXFLOW_NO_EXTENSION", "CXX")
    full = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_an_isolated_install_has_the_kernels(tmp_path):
    # A copy of what git tracks for the package: building in the checkout itself would
    # leave build/ and egg-info there, under the feet of anyone else building it.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "prefixflow",
        src / "prefixflow",
        ignore=shutil.ignore_patterns("__pycache__", "*.so"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, src],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    assert not list(site.rglob("*.so")), "the wheel should be pure Python"

    run = python(CHECK_KERNELS, tmp_path, PYTHONPATH=str(site))
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert Path(got["file"]).is_relative_to(site)
    assert got["available"] and got["op_matches"], run.stderr
    # One build serves every install of the same sources: the checkout's cache folder.
    assert got["folder"] == str(kernel_build.kernel_dir())


def test_a_failed_build_falls_back_with_one_line_and_is_not_retried(tmp_path):
    calls = tmp_path / "calls"
    cxx = tmp_path / "broken-c++"
    cxx.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "error: broken" >&2\nexit 1\n')
    cxx.chmod(0o755)
    env = {"CXX": str(cxx), "PREFIXFLOW_CACHE_DIR": str(tmp_path / "cache")}

    first = python(CHECK_FALLBACK, tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["False", "True", "failed"]
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and "using PyTorch instead" in lines[0] and str(cxx) in lines[0]
    tries = calls.read_text()

    second = python(CHECK_FALLBACK, tmp_path, **env)
    assert second.stdout.split() == ["False", "True", "failed"]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "remembered" in lines[0] and "failed.json" in lines[0]
    assert calls.read_text() == tries, "the failed build ran again"


def test_without_a_compiler_on_path_the_line_says_to_install_one(tmp_path):
    env = {"PATH": str(tmp_path), "PREFIXFLOW_CACHE_DIR": str(tmp_path / "cache")}
    run = python(CHECK_FALLBACK, tmp_path, **env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True", "failed"]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "install one" in lines[0]

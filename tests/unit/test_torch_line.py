"""The torch line: spec/ and structured/ are pure Python (no torch, nothing of the torch
side), and the attention backends see their own AttentionConfig, not the engine's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "prefixflow"
PURE_PACKAGES = ("spec", "structured")
TORCH_SIDE = ("runner", "sample", "attention", "model")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_packages_import_nothing_of_the_torch_side(package):
    torch_side = tuple(f"prefixflow.{p}" for p in TORCH_SIDE) + ("torch", "numpy")
    for path in (ROOT / package).glob("*.py"):
        found = [m for m in _imports(path) if m.startswith(torch_side)]
        assert not found, (path, found)


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_packages_do_not_load_torch(package):
    modules = [f"prefixflow.{package}.{p.stem}" for p in (ROOT / package).glob("*.py")]
    # A bare package object stands in for prefixflow/__init__.py, which imports the engine.
    code = (
        "import sys, types, importlib.util\n"
        "spec = importlib.util.find_spec('prefixflow')\n"
        "pkg = types.ModuleType('prefixflow')\n"
        "pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['prefixflow'] = pkg\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('torch' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_attention_does_not_read_the_engine_config():
    for path in (ROOT / "attention").glob("*.py"):
        found = [m for m in _imports(path) if m.startswith("prefixflow.config")]
        assert not found, (path, found)

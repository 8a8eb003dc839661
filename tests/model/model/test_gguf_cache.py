"""The GGUF conversion cache stays bounded: conversions whose file is gone or changed are
removed, then the least recently used, until the folder fits its limit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from prefixflow.model.loader.gguf_cache import gguf_cache_dir, prune, record_source


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PREFIXFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _conversion(tmp_path: Path, name: str, nbytes: int, used_at: float | None = None) -> Path:
    """A .gguf file and a converted folder for it holding `nbytes` of weights."""
    src = tmp_path / f"{name}.gguf"
    src.write_bytes(b"GGUF" + name.encode())
    entry = gguf_cache_dir(src)
    record_source(entry, src)
    (entry / "weights").mkdir()
    (entry / "weights" / "model.safetensors").write_bytes(b"\0" * nbytes)
    if used_at is not None:
        os.utime(entry / "source.json", (used_at, used_at))
    return entry


def test_conversions_of_deleted_or_changed_files_are_removed(tmp_path):
    kept = _conversion(tmp_path, "kept", 10)
    gone = _conversion(tmp_path, "gone", 10)
    changed = _conversion(tmp_path, "changed", 10)
    new = _conversion(tmp_path, "new", 10)
    (tmp_path / "gone.gguf").unlink()
    (tmp_path / "changed.gguf").write_bytes(b"GGUF rewritten, longer")

    removed = prune(keep=new, limit=10**9)

    assert sorted(removed) == sorted([gone, changed])
    assert kept.exists() and new.exists() and not gone.exists() and not changed.exists()


def test_the_least_recently_used_go_first_until_the_folder_fits(tmp_path):
    now = time.time()
    oldest = _conversion(tmp_path, "oldest", 10_000, used_at=now - 300)
    older = _conversion(tmp_path, "older", 10_000, used_at=now - 200)
    recent = _conversion(tmp_path, "recent", 10_000, used_at=now - 100)
    new = _conversion(tmp_path, "new", 10_000)

    removed = prune(keep=new, limit=25_000)  # room for two of the four, the new one among them

    assert removed == [oldest, older]
    assert recent.exists() and new.exists()


def test_the_new_conversion_stays_even_over_the_limit(tmp_path):
    other = _conversion(tmp_path, "other", 100)
    new = _conversion(tmp_path, "new", 1000)

    assert prune(keep=new, limit=10) == [other]
    assert new.exists()


def test_a_folder_without_a_record_is_left_while_young(tmp_path, cache_home):
    young = cache_home / "gguf" / "young"
    old = cache_home / "gguf" / "old"  # left by a crashed conversion or an older prefixflow
    for d in (young, old):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    new = _conversion(tmp_path, "new", 10)

    assert prune(keep=new, limit=10**9) == [old]
    assert young.exists()

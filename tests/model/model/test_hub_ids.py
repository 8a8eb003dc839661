"""Hub ids (`org/name`) resolve through huggingface_hub's cache, offline, as the machines
that run prefixflow usually are: the cache is built here the way huggingface_hub lays it
out (blobs named by their hash, snapshot folders of links, refs naming commits)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from prefixflow import LLM
from prefixflow.model.loader import resolve_model
from tests.model_folders import greedy_ids, tiny_llama_folder

COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: Path, refs=("main",)) -> Path:
    """files as the snapshot `commit` of repo_id in the cache, with refs naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in files.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes no newline
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def tiny_llama(tokenizer, tmp_path_factory) -> Path:
    return tiny_llama_folder(tokenizer, tmp_path_factory.mktemp("tiny-llama"))


def test_a_hub_id_loads_from_the_cache_and_generates_as_the_folder(hub_cache, tiny_llama):
    snapshot = cache_snapshot(hub_cache, "org/name", COMMIT_MAIN, tiny_llama)
    src = resolve_model("org/name")
    assert src.path == snapshot and src.name == "org/name" and not src.is_gguf

    hub = LLM(model="org/name", dtype="float32", kv_cache_memory="64MiB")
    local = LLM(model=str(tiny_llama), dtype="float32", kv_cache_memory="64MiB")
    assert greedy_ids(hub) == greedy_ids(local)


def test_a_revision_picks_the_snapshot_its_ref_names(hub_cache, tmp_path):
    for commit, refs, layers in ((COMMIT_MAIN, ["main"], 2), (COMMIT_V2, ["v2"], 3)):
        files = tmp_path / commit
        files.mkdir()
        (files / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        cache_snapshot(hub_cache, "org/name", commit, files, refs)

    def layers(**kw) -> int:
        return json.loads((resolve_model("org/name", **kw).path / "config.json").read_text())[
            "num_hidden_layers"
        ]

    assert layers() == 2
    assert layers(revision="main") == 2
    assert layers(revision="v2") == 3
    assert layers(revision=COMMIT_V2) == 3  # a commit needs no ref


def test_a_gguf_file_of_a_hub_repo(hub_cache, tmp_path):
    import gguf

    files = tmp_path / "files"
    files.mkdir()
    w = gguf.GGUFWriter(files / "model-Q4_1.gguf", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cache_snapshot(hub_cache, "org/name-GGUF", COMMIT_MAIN, files)
    src = resolve_model("org/name-GGUF/model-Q4_1.gguf")
    assert src.is_gguf and src.name == "org/name-GGUF/model-Q4_1.gguf"
    assert src.path.read_bytes()[:4] == b"GGUF"


def test_a_missing_id_says_where_it_looked_and_how_to_download_it(hub_cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("org/missing", revision="dev")
    message = str(e.value)
    for needle in ("org/missing", "'dev'", str(hub_cache), "download org/missing"):
        assert needle in message, (needle, message)
    assert "HF_HUB_OFFLINE" in message  # why the Hub itself was not asked


def test_without_network_a_missing_id_fails_at_once_with_the_same_advice(hub_cache, monkeypatch):
    """HF_HUB_OFFLINE unset and the Hub unreachable (a closed port stands for it)."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("org/missing")
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "org/missing" in message and str(hub_cache) in message
    assert "download org/missing" in message and "could not provide it" in message


def test_without_network_a_cached_id_still_loads(hub_cache, monkeypatch, tmp_path):
    from huggingface_hub import constants

    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text("{}")
    snapshot = cache_snapshot(hub_cache, "org/name", COMMIT_MAIN, files)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model("org/name").path == snapshot


def test_run_batch_takes_a_hub_id(hub_cache, tiny_llama, tmp_path):
    from prefixflow.entrypoints.cli import main

    cache_snapshot(hub_cache, "org/name", COMMIT_MAIN, tiny_llama)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": 4, "temperature": 0},
        }
        for i, prompt in enumerate(["Hello", "The sky is"])
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["run-batch", str(inp), "-o", str(out), "--model", "org/name"]
    argv += ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--no-progress"]
    assert main(argv) == 0
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["c0", "c1"]
    for r in results:
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["body"]["model"] == "org/name"
        assert r["response"]["body"]["usage"]["completion_tokens"] == 4

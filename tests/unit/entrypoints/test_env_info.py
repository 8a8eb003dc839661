"""`prefixflow env`: every field there, and the kernels' state as native.py sees it."""

from __future__ import annotations

import json

from prefixflow import native
from prefixflow.entrypoints import cli, env_info

FIELDS = {
    "prefixflow",
    "prefixflow_path",
    "python",
    "torch",
    "torch_threads",
    "cpu_count",
    "cpu_flags",
    "dtype_auto",
    "kernels",
    "default_model",
    "default_model_error",
    "env",
}


def test_json_has_every_field_and_the_kernels_state(capsys):
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == FIELDS
    assert set(info["cpu_flags"]) == set(env_info.CPU_FLAGS)
    assert info["dtype_auto"] in ("bfloat16", "float32")
    kernels = info["kernels"]
    assert kernels["available"] == native.available()
    assert kernels["status"] == native.state().status
    assert kernels["status"] in ("built", "cached", "failed", "disabled")
    if kernels["available"]:
        assert kernels["cache_dir"]


def test_text_names_the_kernels_and_dtype(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "kernels" in out and "dtype      auto -> " in out
    assert ("on (" if native.available() else "OFF (") in out


def test_no_extension_shows_disabled(monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_NO_EXTENSION", "1")
    native.available.cache_clear()
    try:
        info = env_info.collect()
        assert info["kernels"]["status"] == "disabled" and not info["kernels"]["available"]
        assert info["env"]["PREFIXFLOW_NO_EXTENSION"] == "1"
    finally:
        monkeypatch.delenv("PREFIXFLOW_NO_EXTENSION")
        native.available.cache_clear()

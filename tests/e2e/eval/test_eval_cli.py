"""`prefixflow eval`: lm-eval's arguments and the engine's flags, one process, lm-eval's
results table; an unknown task, a missing lm-eval and a bad argument are clear errors."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from prefixflow.entrypoints.cli import main
from tests.e2e.eval.conftest import TASKS_DIR, samples_by_doc

pytestmark = pytest.mark.slow
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="needs the eval extra: pip install 'prefixflow[eval]'",
)


@needs_lm_eval
def test_eval_prints_lm_evals_table_and_writes_its_results(
    tiny_model, hf_results, tmp_path, capsys
):
    argv = ["eval", "--model", str(tiny_model), "--dtype", "float32", "--kv-cache-memory", "64MiB"]
    argv += ["--include_path", str(TASKS_DIR), "--tasks", "pf_capitals,pf_arithmetic"]
    argv += [
        "--limit",
        "2",
        "--output_path",
        str(tmp_path),
        "--log_samples",
        "--seed",
        "0,1234,1234,1234",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "|pf_capitals  |" in out and "|acc_norm   |" in out and "|exact_match|" in out
    assert "limit: 2.0, num_fewshot: None" in out
    (results_file,) = tmp_path.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["configs"]["pf_capitals"]["num_fewshot"] == 5
    (samples_file,) = tmp_path.rglob("samples_pf_capitals_*.jsonl")
    got = [json.loads(line) for line in samples_file.read_text().splitlines()]
    want = samples_by_doc(hf_results, "pf_capitals")[:2]
    for g, w in zip(sorted(got, key=lambda s: s["doc_id"]), want, strict=True):
        for (gl, gg), (wl, wg) in zip(g["filtered_resps"], w["filtered_resps"], strict=True):
            assert abs(float(gl) - wl) <= 1e-4 and (gg in (True, "True")) == wg


@needs_lm_eval
def test_an_unknown_task_is_named_before_the_model_loads(monkeypatch, capsys):
    import lm_eval.tasks

    # lm-eval's own tasks are left out of the search: indexing their thousands of files
    # takes some 8 s, and finds no such task either.
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", lambda *a, **kw: real(*a, **{**kw, "include_defaults": False})
    )
    argv = ["eval", "--model", "/nonexistent/model", "--include_path", str(TASKS_DIR)]
    assert main(argv + ["--tasks", "pf_capitals", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "Tasks not found: no_such_task" in err and "--include_path" in err
    assert "cannot load the model" not in err


def test_lm_eval_missing_says_which_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", "--tasks", "pf_capitals"]) == 2
    assert "pip install 'prefixflow[eval]'" in capsys.readouterr().err


@needs_lm_eval
def test_bad_arguments_are_refused_by_lm_evals_own_checks(capsys):
    assert main(["eval", "--tasks", "pf_capitals", "--log_samples"]) == 2
    assert "Specify --output_path" in capsys.readouterr().err
    assert main(["eval", "--tasks", "pf_capitals", "--seed", "1,x"]) == 2
    assert "--seed takes integers or None" in capsys.readouterr().err

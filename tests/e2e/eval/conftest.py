"""A tiny random-weight Llama with the default model's tokenizer, the local lm-eval tasks,
and lm-eval's own transformers backend's results on them (the reference), shared by the
tests of every route.

The model is 2 layers of width 64: every request costs microseconds, so the tests measure
the plumbing (tokenization, windows, truncation, stop strings, logprob positions) and not
the CPU. Its tokenizer is the real one, so the splits of context and continuation are the
ones real tasks meet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_folders import TINY_LLAMA

TASKS_DIR = Path(__file__).resolve().parents[2] / "data" / "lm_eval_tasks"
TASKS = ["pf_capitals", "pf_arithmetic", "pf_passages"]
SHORT = 32  # a max_length that cuts every few-shot prompt and splits every passage


def build_tiny_model(folder: Path) -> Path:
    """A random-weight Llama (2 layers, width 64, 512 positions) saved with the default
    model's tokenizer. Peaked weights (initializer_range 0.2): no near-ties in the greedy
    choices or between the choices' scores."""
    import torch
    import transformers

    from prefixflow.model.loader import load_tokenizer, resolve_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, pad_token_id=0, **TINY_LLAMA)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    load_tokenizer(resolve_model(None)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _no_environment_report():
    """simple_evaluate reports the environment into its results through torch's
    collect_env, a dozen subprocesses (0.6 s a call); nothing here reads it."""
    try:
        import lm_eval.evaluator
    except ImportError:  # the tests that need it are skipped
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        mp.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def task_manager():
    """The local tasks alone: indexing lm-eval's own thousands of task files takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def evaluate(lm, task_manager, tasks=TASKS, **kwargs) -> dict:
    """lm-eval's simple_evaluate on the local tasks, every sample logged, no bootstrap."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )


@pytest.fixture(scope="session")
def hf_lm(tiny_model):
    """lm-eval's `hf` model on the tiny folder, float32."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model), dtype="float32", device="cpu", batch_size=16)


@pytest.fixture(scope="session")
def hf_results(hf_lm, task_manager) -> dict:
    return evaluate(hf_lm, task_manager)


@pytest.fixture(scope="session")
def hf_results_short(hf_lm, task_manager) -> dict:
    """The same with max_length 32: every few-shot prompt cut from the left, every passage
    scored in several rolling windows."""
    from lm_eval.models.huggingface import HFLM

    short = HFLM(pretrained=hf_lm.model, tokenizer=hf_lm.tokenizer, batch_size=16, max_length=SHORT)
    return evaluate(short, task_manager)


@pytest.fixture(scope="session")
def pf_lm(tiny_model):
    from prefixflow.integrations.lm_eval import PrefixflowLM

    return PrefixflowLM(pretrained=str(tiny_model), dtype="float32", kv_cache_memory="128MiB")


def samples_by_doc(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def assert_same_results(
    got: dict, want: dict, tasks=TASKS, tol: float = 1e-4, same_prompts: bool = True
) -> None:
    """Every metric equal (perplexities to float rounding), every request's loglikelihood
    within tol, the same is_greedy flags, the same generated text, request by request
    (same_prompts: and the same prompts, where both sides send text)."""
    for task in tasks:
        got_m, want_m = got["results"][task], want["results"][task]
        for name, value in want_m.items():
            if not isinstance(value, float) or "stderr" in name:
                continue
            if "perplexity" in name or "bits_per_byte" in name:
                assert got_m[name] == pytest.approx(value, rel=1e-5), (task, name)
            else:
                assert got_m[name] == value, (task, name)
        got_s, want_s = samples_by_doc(got, task), samples_by_doc(want, task)
        assert len(got_s) == len(want_s) > 0, task
        for g, w in zip(got_s, want_s, strict=True):
            if same_prompts:
                assert g["arguments"] == w["arguments"], (task, g["doc_id"])
            for gr, wr in zip(g["filtered_resps"], w["filtered_resps"], strict=True):
                if isinstance(wr, str):
                    assert gr == wr, (task, g["doc_id"])
                elif isinstance(wr, (list, tuple)):  # (loglikelihood, is_greedy)
                    assert abs(gr[0] - wr[0]) <= tol, (task, g["doc_id"], gr, wr)
                    assert bool(gr[1]) == bool(wr[1]), (task, g["doc_id"])
                else:  # a rolling loglikelihood
                    assert abs(gr - wr) <= tol, (task, g["doc_id"], gr, wr)

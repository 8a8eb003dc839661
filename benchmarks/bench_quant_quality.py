"""What each quantization mode costs in quality, measured against bfloat16 in one run.

For the default model (SmolLM2-135M-Instruct from its Q4_1 GGUF file) and, with
--random-model, a random-weight Llama of another shape (hidden 512, 8 layers, float32
safetensors), it loads the model once per mode and prints:

- perplexity on a fixed English text shipped with Python itself (the prose of
  `pydoc_data.topics`, the language reference; about 100K tokens with --tokens 0), cut
  into windows of --window tokens, every token after a window's first scored through
  prompt logprobs; and its change against the bf16 reference;
- greedy agreement on --prompts prompts (sentences of the same text as completions,
  --max-tokens tokens each): the share of outputs identical to bf16's, and the mean
  share of each output's tokens before the first difference;
- multiple-choice accuracy on a local task built from the same text (a sentence without
  its last three words; the choices are those words and the last three of three other
  sentences; the choice with the highest sum of logprobs wins; 0-shot).

The random model's perplexity is that of random weights (near the vocabulary size): only
its relative change means anything. bf16 is the reference for every mode (the mode's
weights with activations in bf16); with --float32, `none` at float32 is printed too, as
the distance of bf16 itself.

    .venv/bin/python benchmarks/bench_quant_quality.py                 # the whole text
    .venv/bin/python benchmarks/bench_quant_quality.py --tokens 20000 --prompts 50
"""

from __future__ import annotations

import argparse
import math
import random
import re
import tempfile
import time
from pathlib import Path

from prefixflow import LLM, SamplingParams

MODES = ["none", "int8", "int8_weight_only", "int4", "gguf", "auto"]


def reference_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def sentences(text: str) -> list[str]:
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 8 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".") and "::" not in s:
            out.append(s)
    return out


def perplexity(llm: LLM, ids: list[int], window: int) -> tuple[float, int]:
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1]
    outs = llm.generate(
        [{"prompt_token_ids": w} for w in windows],
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
        use_tqdm=False,
    )
    nll, n = 0.0, 0
    for out, w in zip(outs, windows, strict=True):
        for tok, entry in zip(w[1:], out.prompt_logprobs[1:], strict=True):
            nll -= entry[tok].logprob
            n += 1
    return math.exp(nll / n), n


def greedy(llm: LLM, prompts: list[str], max_tokens: int) -> list[list[int]]:
    outs = llm.generate(
        prompts,
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs]


def mc_items(sents: list[str], n: int, seed: int = 0) -> list[tuple[str, list[str], int]]:
    rng = random.Random(seed)
    pool = [s for s in sents if len(s.split()) >= 10]
    rng.shuffle(pool)
    items = []
    for i, s in enumerate(pool[:n]):
        words = s.split()
        stem, answer = " ".join(words[:-3]), " " + " ".join(words[-3:])
        others = [" " + " ".join(pool[(i + j) % len(pool)].split()[-3:]) for j in (7, 13, 29)]
        choices = [answer, *others]
        rng.shuffle(choices)
        items.append((stem, choices, choices.index(answer)))
    return items


def mc_accuracy(llm: LLM, items) -> float:
    tok = llm.get_tokenizer()
    prompts, spans = [], []
    for stem, choices, _ in items:
        stem_ids = tok.encode(stem)
        for c in choices:
            ids = tok.encode(stem + c)
            prompts.append({"prompt_token_ids": ids})
            spans.append(len(stem_ids))
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False
    )
    scores = []
    for out, p, start in zip(outs, prompts, spans, strict=True):
        ids = p["prompt_token_ids"]
        scores.append(sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))))
    right = 0
    for q, (_, choices, answer) in enumerate(items):
        s = scores[q * len(choices) : (q + 1) * len(choices)]
        right += s.index(max(s)) == answer
    return right / len(items)


def random_model(folder: Path, tokenizer_src: LLM) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    tok = tokenizer_src.get_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(model: str | None, label: str, modes: list[str], args, data) -> None:
    ids, prompts, items = data
    rows, ref_out = [], None
    for mode in [*(["none@float32"] if args.float32 else []), *modes]:
        m, _, dtype = mode.partition("@")
        if m == "gguf" and (model is not None and not model.endswith(".gguf")):
            continue
        t = time.perf_counter()
        llm = LLM(model=model, dtype=dtype or "bfloat16", quantization=m, kv_cache_memory="1GiB")
        ppl, n = perplexity(llm, ids, args.window)
        out = greedy(llm, prompts, args.max_tokens)
        acc = mc_accuracy(llm, items)
        if mode == "none":
            ref_out = out
        rows.append((mode, ppl, out, acc, time.perf_counter() - t))
        print(
            f"  {label} {mode}: perplexity {ppl:.3f} over {n} tokens, "
            f"accuracy {acc:.3f} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    ref_ppl = next(r[1] for r in rows if r[0] == "none")
    print(f"\n{label}: against bf16 (none)")
    print(
        f"{'mode':<18}{'perplexity':>12}{'change':>9}{'greedy same':>13}{'prefix kept':>13}"
        f"{'MC acc':>8}"
    )
    for mode, ppl, out, acc, _ in rows:
        same = sum(a == b for a, b in zip(out, ref_out, strict=True)) / len(out)
        kept = sum(_prefix(a, b) / max(1, len(b)) for a, b in zip(out, ref_out, strict=True))
        print(
            f"{mode:<18}{ppl:>12.3f}{(ppl / ref_ppl - 1) * 100:>8.2f}%{same:>12.1%}"
            f"{kept / len(out):>12.1%}{acc:>8.3f}"
        )


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=0, help="text tokens to score (0: all)")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--random-model", action="store_true")
    ap.add_argument("--float32", action="store_true", help="also none in float32")
    args = ap.parse_args()
    modes = args.modes.split(",")
    text = reference_text()
    sents = sentences(text)
    base = LLM(dtype="float32", kv_cache_memory="256MiB")
    ids = base.get_tokenizer().encode(text)
    ids = ids[: args.tokens] if args.tokens else ids
    prompts = sents[::7][: args.prompts]
    data = (ids, prompts, mc_items(sents, args.questions))
    print(f"text: {len(ids)} tokens; {len(prompts)} greedy prompts; {args.questions} questions")
    run(None, "default model (Q4_1 GGUF)", modes, args, data)
    if args.random_model:
        with tempfile.TemporaryDirectory() as tmp:
            folder = random_model(Path(tmp), base)
            run(str(folder), "random Llama 512x8", [m for m in modes if m != "gguf"], args, data)


if __name__ == "__main__":
    main()

"""Speculative decoding (n-gram or a draft model) on and off, on outputs that copy from their prompts.

Each request asks the default model to correct the spelling of a passage of English prose
(with a misspelling in every seventh word), greedy, a fixed number of output tokens. The
same requests run with speculation off and on ("auto": on only where it pays), at each
concurrency (all requests of a row run at once), in one process and one sitting:

    .venv/bin/python benchmarks/bench_speculation.py [--seqs 1,4,16,256] [--tokens 256]
        [--draft-model PATH]

With --draft-model, a draft model (a model folder or .gguf with the default model's
tokenizer) drafts instead of the n-gram proposer.

It prints output tokens per second off and on, their ratio, and the acceptance rate.
"""

from __future__ import annotations

import argparse
import random
import time

from prefixflow.bench.workloads import corpus_paragraphs
from prefixflow.llm import LLM
from prefixflow.sampling_params import SamplingParams


def misspell(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i in range(3, len(words), 7):
        w = words[i]
        if len(w) > 3 and w.isalpha():
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # two letters swapped
    return " ".join(words)


def requests(n: int) -> list[list[dict]]:
    rng = random.Random(0)
    paras = corpus_paragraphs()
    out = []
    for i in range(n):
        passage = " ".join(paras[(7 * i + k) % len(paras)] for k in range(2))[:1400]
        text = misspell(passage, rng)
        out.append(
            [
                {
                    "role": "user",
                    "content": "Correct the spelling of this passage. Reply with the corrected "
                    f"passage only.\n\n{text}",
                }
            ]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1,4,16,256")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--always", action="store_true", help="draft whenever a match is found")
    ap.add_argument("--draft-model", help="draft with this model instead of n-grams")
    args = ap.parse_args()
    spec = {"num_speculative_tokens": args.k, "auto": not args.always}
    if args.draft_model:
        spec.update(method="draft_model", model=args.draft_model)
    else:
        spec.update(method="ngram", prompt_lookup_max=4, prompt_lookup_min=2)
    engines = {
        "off": LLM(dtype=args.dtype, max_num_seqs=256),
        "on": LLM(dtype=args.dtype, max_num_seqs=256, speculative_config=spec),
    }
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    print(
        f"{args.dtype}, greedy, {args.tokens} tokens out, {spec['method']} k={args.k}, "
        f"{'always' if args.always else 'auto'}"
    )
    print(
        f"{'seqs':>5} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7} {'accepted':>9} {'same':>5}"
    )
    for n in [int(x) for x in args.seqs.split(",")]:
        batch = requests(n)
        rate, tokens = {}, {}
        for name, llm in engines.items():
            llm.chat(batch[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
            st = llm.engine.stats
            d0, a0 = st.draft_tokens, st.accepted_tokens
            t0 = time.perf_counter()
            outs = llm.chat(batch, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            rate[name] = n * args.tokens / dt
            tokens[name] = [o.outputs[0].token_ids for o in outs]
            st = llm.engine.stats  # a snapshot: read again after the run
            drafted, accepted = st.draft_tokens - d0, st.accepted_tokens - a0
        acc = f"{accepted / drafted:.0%}" if drafted else "-"
        same = "yes" if tokens["on"] == tokens["off"] else "NO"
        print(
            f"{n:>5} {rate['off']:>10.1f} {rate['on']:>10.1f} {rate['on'] / rate['off']:>6.2f}x "
            f"{acc:>9} {same:>5}"
        )


if __name__ == "__main__":
    main()

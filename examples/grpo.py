"""A GRPO-style reinforcement-learning loop: prefixflow generates, transformers trains.

Each round prefixflow samples n answers to each of a few yes/no questions, a program
scores them, and one policy-gradient step on a transformers copy of the same model
raises the likelihood of the answers that scored above their question's average (GRPO's
group baseline). `llm.update_weights` then hands the new weights to the engine in place,
with no reload, and the next round samples from them.

The reward asks for a format: the answer starts with "Yes" or "No" (1 point), and is
short (up to 0.5 more). The default model rarely answers that way at first.

    .venv/bin/python examples/grpo.py [--rounds 12] [--chart docs/grpo_reward.png]

It runs in a few minutes on 2 cores and prints the mean reward of each round.
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from prefixflow import LLM, SamplingParams

QUESTIONS = [
    "Is Paris in France?",
    "Is the sun cold?",
    "Do fish swim?",
    "Can cats fly?",
    "Is water wet?",
    "Is seven an even number?",
    "Do trees have leaves?",
    "Is ice hot?",
]


def reward(text: str) -> float:
    words = re.findall(r"[A-Za-z']+", text)
    if not words:
        return 0.0
    answers = 1.0 if words[0].lower() in ("yes", "no") else 0.0
    return answers + 0.5 * max(0.0, 1 - (len(words) - 1) / 12)


def trainable_copy(llm: LLM):
    """The engine's model as a transformers model (float32), from the same weights."""
    from transformers import AutoModelForCausalLM

    from prefixflow.model.loader import iter_weights, load_hf_config, resolve_model

    src = resolve_model(llm.config.model, llm.config.revision)
    cfg = load_hf_config(src)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {name: t for name, t in iter_weights(src, cfg)}
    if getattr(cfg, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=False)
    return model.train()


def policy_gradient_step(model, optimizer, batch: list[tuple[list[int], list[int], float]]) -> None:
    """One step on the sum over answers of -advantage x mean log-likelihood of the answer,
    the answers right-padded into one batch."""
    optimizer.zero_grad()
    width = max(len(p) + len(a) for p, a, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    answer_mask = torch.zeros(len(batch), width - 1)
    for i, (prompt, answer, _) in enumerate(batch):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        attention[i, :n] = 1
        answer_mask[i, len(prompt) - 1 : n - 1] = 1.0 / len(answer)  # rows predicting it
    advantages = torch.tensor([adv for _, _, adv in batch])
    rows = answer_mask.nonzero(as_tuple=True)  # only rows predicting answer tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights, bfloat16 matmuls
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][rows])  # (answer tokens, V)
    logp = torch.log_softmax(logits.float(), -1).gather(1, ids[:, 1:][rows][:, None])[:, 0]
    per_answer = torch.zeros(len(batch)).index_add(0, rows[0], logp * answer_mask[rows])
    loss = -(advantages * per_answer).mean()
    loss.backward()
    optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--n", type=int, default=8, help="samples per question")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--chart", help="save the reward curve to this PNG")
    args = ap.parse_args()
    torch.manual_seed(0)
    llm = LLM(dtype="bfloat16")
    model = trainable_copy(llm)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    convs = [[{"role": "user", "content": f"{q} Answer with one word."}] for q in QUESTIONS]
    means = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        params = SamplingParams(temperature=0.8, n=args.n, max_tokens=24, seed=1000 * r)
        outs = llm.chat(convs, params, use_tqdm=False)
        t_gen = time.perf_counter() - t0
        batch, scores = [], []
        for out in outs:
            group = [reward(c.text) for c in out.outputs]
            mean = sum(group) / len(group)
            std = (sum((g - mean) ** 2 for g in group) / len(group)) ** 0.5
            for c, g in zip(out.outputs, group, strict=True):
                if c.token_ids and std > 0:
                    batch.append((out.prompt_token_ids, c.token_ids, (g - mean) / (std + 1e-4)))
            scores += group
        means.append(sum(scores) / len(scores))
        t1 = time.perf_counter()
        if batch:
            policy_gradient_step(model, optimizer, batch)
        t_train = time.perf_counter() - t1
        t2 = time.perf_counter()
        llm.update_weights(model.named_parameters())  # in place, no reload
        t_update = time.perf_counter() - t2
        print(
            f"round {r:2d}  mean reward {means[-1]:.2f}  generate {t_gen:4.1f}s  "
            f"train {t_train:4.1f}s  update_weights {t_update:.2f}s  (weights v{llm.weight_version})",
            flush=True,
        )
    if args.chart:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(range(len(means)), means, marker="o")
        ax.set_xlabel("round (one policy-gradient step each)")
        ax.set_ylabel("mean reward")
        ax.set_title("GRPO-style loop on SmolLM2-135M-Instruct (examples/grpo.py)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.chart, dpi=120)
        print(f"reward curve: {args.chart}")


if __name__ == "__main__":
    main()

"""Next-token choice for a step's sequences: greedy, temperature, top-k, top-p, min-p.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly
from p. A seeded request takes its noise from its own generator, one draw of the vocabulary
per token, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from prefixflow.engine.outputs import SampledToken, ScheduledSeq


class Sampler:
    def __init__(self, seed: int = 0, greedy_fast_path: bool = True) -> None:
        self.greedy_fast_path = greedy_fast_path
        self._shared = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> list[SampledToken]:
        """logits: (S, V) in the model's dtype, one row per sequence in seqs (not modified)."""
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        plain_greedy = (
            self.greedy_fast_path
            and not any(want_logprobs)
            and all(s.params.greedy and not s.masked_token_ids for s in seqs)
        )
        if plain_greedy:
            # argmax is exact in any dtype: skip a (S, V) float32 copy per step. max().indices
            # (first maximum, like argmax) is several times faster than argmax on bfloat16.
            return [SampledToken(t) for t in logits.max(dim=-1).indices.tolist()]
        masking = any(s.masked_token_ids for s in seqs)
        logits = logits.to(torch.float32, copy=masking)  # masks below write in place
        # Raw model log-probabilities, before any masking or temperature (vLLM's default).
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        for i, s in enumerate(seqs):
            if s.masked_token_ids:
                logits[i, list(s.masked_token_ids)] = float("-inf")

        tokens = logits.argmax(dim=-1)  # greedy for all; sampled rows overwrite below
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            probs = self._probs(logits[rows], [seqs[i] for i in sampled_rows])
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampled_rows):
                gen = self._generator(seqs[i])
                noise[j].exponential_(generator=gen)
            tokens[rows] = (probs / noise).argmax(dim=-1)

        out: list[SampledToken] = []
        token_list = tokens.tolist()
        for i, s in enumerate(seqs):
            tok = SampledToken(token_list[i])
            if want_logprobs[i]:
                row = raw_logprobs[i]
                lp = row[tok.token_id]
                tok.logprob = float(lp)
                tok.rank = int((row > lp).sum()) + 1
                k = s.params.logprobs
                if k:
                    vals, ids = row.topk(k)
                    tok.top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                else:
                    tok.top = []
            out.append(tok)
        return out

    def _generator(self, seq: ScheduledSeq) -> torch.Generator:
        if seq.params.seed is None:
            return self._shared
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seq.params.seed)
            self._generators[seq.request_id] = gen
        return gen

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """(R, V) logits of sampled rows -> filtered, renormalised probabilities."""
        temp = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
        logits = logits / temp
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([s.params.min_p for s in seqs]).unsqueeze(1)
        if (min_p > 0).any():
            keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
            probs = probs * keep
        return probs


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([min(t, V) if t > 0 else V for t in top_k])
    ranks = torch.arange(V).unsqueeze(0)
    drop = ranks >= k.unsqueeze(1)  # beyond top-k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop tokens once the mass before them already reaches top_p; the top token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

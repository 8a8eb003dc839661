"""Next-token choice for a whole step in one vectorised pass: greedy, temperature, top-k,
top-p, min-p, seeded or not, with logprobs.

Every sampled row draws by inverse CDF from one uniform number u: the chosen token is the
first whose cumulative weight exceeds u times the row's total. A seeded request takes u
from a counter-based hash of (seed, output position) (noise.py), so its tokens depend on
nothing else in the batch and need no per-request state; unseeded rows take u from one
generator seeded once per engine. The CDF is taken in two levels (sums of blocks of the
vocabulary, then the chosen block), which keeps the cost at about one pass of exp and one
of sums over the logits. Greedy rows cost an argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixflow import native
from prefixflow.sample.noise import seeded_uniform
from prefixflow.step import SampledToken, ScheduledSeq

# Vocabulary entries per block of the two-level CDF, at most (about the square root of a
# vocabulary of 50,000, so both levels stay short).
_BLOCK = 256
# top-p looks for its nucleus among this many best tokens first; a row whose nucleus is
# larger sorts its whole vocabulary.
_TOP_P_CANDIDATES = 1024


@dataclass
class _Rows:
    """The rows of one kind, as indices into the step's rows."""

    index: list[int]

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.index, dtype=torch.long)


class Sampler:
    def __init__(
        self, seed: int = 0, greedy_fast_path: bool = True, use_kernel: bool = True
    ) -> None:
        self.greedy_fast_path = greedy_fast_path
        # The weights and block sums in one C++ pass (csrc/sampling.cpp), where built.
        self.kernel = (
            torch.ops.prefixflow.sampling_weights if use_kernel and native.available() else None
        )
        self._shared = torch.Generator().manual_seed(seed)
        self._buf = torch.empty(0, dtype=torch.float32)

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, seqs: list[ScheduledSeq], raw: torch.Tensor | None = None
    ) -> list[SampledToken]:
        """logits: (S, V), one row per sequence in seqs (not modified); raw: the model's
        logits before penalties and biases, for logprobs (default: logits)."""
        raw = logits if raw is None else raw
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        plain_greedy = (
            self.greedy_fast_path
            and not any(want_logprobs)
            and all(s.params.greedy and not s.masked_token_ids for s in seqs)
        )
        if plain_greedy:
            # argmax is exact in any dtype: no float32 copy. max().indices (first maximum,
            # like argmax) is several times faster than argmax on bfloat16.
            return [SampledToken(t) for t in logits.max(dim=-1).indices.tolist()]

        tokens = torch.empty(len(seqs), dtype=torch.long)
        raw_logprobs: dict[int, torch.Tensor] = {}
        lp_rows = [i for i, w in enumerate(want_logprobs) if w]
        if lp_rows:
            # Raw model log-probabilities, before any masking or temperature (vLLM's default).
            lp = torch.log_softmax(raw[torch.tensor(lp_rows)].float(), dim=-1)
            raw_logprobs = {i: lp[j] for j, i in enumerate(lp_rows)}

        greedy = _Rows([i for i, s in enumerate(seqs) if s.params.greedy])
        sampled = _Rows([i for i, s in enumerate(seqs) if not s.params.greedy])
        if greedy.index:
            tokens[greedy.tensor()] = self._greedy(logits, [seqs[i] for i in greedy.index], greedy)
        if sampled.index:
            tokens[sampled.tensor()] = self._sample(
                logits, [seqs[i] for i in sampled.index], sampled
            )

        out: list[SampledToken] = []
        for i, (s, tok) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            st = SampledToken(tok)
            if want_logprobs[i]:
                row = raw_logprobs[i]
                lp_tok = row[tok]
                st.logprob = float(lp_tok)
                st.rank = int((row > lp_tok).sum()) + 1
                k = s.params.logprobs
                if k:
                    vals, ids = row.topk(k)
                    st.top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                else:
                    st.top = []
            out.append(st)
        return out

    # ---- greedy rows: an argmax, after the banned tokens of min_tokens ----
    @staticmethod
    def _greedy(logits: torch.Tensor, seqs: list[ScheduledSeq], rows: _Rows) -> torch.Tensor:
        x = logits[rows.tensor()]
        if any(s.masked_token_ids for s in seqs):
            x = x.float()
            _mask(x, seqs)
        return x.max(dim=-1).indices

    # ---- sampled rows: one uniform each, inverse CDF over the filtered distribution ----
    def _sample(self, logits: torch.Tensor, seqs: list[ScheduledSeq], rows: _Rows) -> torch.Tensor:
        R, V = len(seqs), logits.shape[1]
        B = min(_BLOCK, V)
        nb = -(-V // B)
        # (R, nb * B) float32 scores, then weights; the tail beyond V weighs 0. The buffer
        # is kept: a fresh one of tens of megabytes page-faults on every touch.
        if self._buf.numel() < R * nb * B:
            self._buf = torch.empty(R * nb * B, dtype=torch.float32)
        w = self._buf[: R * nb * B].view(R, nb * B)
        inv_temp = 1.0 / torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
        masked = any(s.masked_token_ids for s in seqs)
        if self.kernel is not None:
            src, index = logits, rows.tensor()
            if masked:  # rare (min_tokens): a masked float32 copy of these rows
                src, index = logits[index].float(), torch.arange(R)
                _mask(src, seqs)
            sums = torch.empty(R, nb, dtype=torch.float64)
            self.kernel(src, index, inv_temp, w, sums)
        else:
            w[:, V:] = float("-inf")
            xv = w[:, :V]
            xv.copy_(logits if R == logits.shape[0] else logits[rows.tensor()])
            _mask(xv, seqs)
            xv.mul_(inv_temp.unsqueeze(1))
            xv.sub_(xv.amax(dim=-1, keepdim=True))
            w.exp_()  # weights relative to the best token's (1); masked tokens 0
            sums = None
        if _filter(w[:, :V], seqs) or sums is None:  # vLLM's order: min-p, top-k, top-p
            sums = w.view(R, nb, B).sum(dim=-1).double()  # (R, nb)
        u = self._uniforms(seqs)
        blocks = w.view(R, nb, B)
        cdf = sums.cumsum(dim=-1)
        target = u * cdf[:, -1]
        blk = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
        blk = torch.minimum(blk, _last_nonzero(sums))  # u * total rounding to the total
        prev = cdf.gather(1, (blk - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        before = torch.where(blk > 0, prev, torch.zeros_like(prev))
        inner = blocks[torch.arange(R), blk].double()  # (R, B)
        icdf = inner.cumsum(dim=-1)
        idx = torch.searchsorted(icdf, (target - before).unsqueeze(1), right=True).squeeze(1)
        idx = torch.minimum(idx, _last_nonzero(inner))
        return blk * B + idx

    def _uniforms(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """u in (0, 1) per row, float64: counter-based for seeded rows, else the shared stream."""
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        u = torch.empty(len(seqs), dtype=torch.float64)
        if unseeded:
            u[torch.tensor(unseeded)] = torch.rand(
                len(unseeded), generator=self._shared, dtype=torch.float64
            )
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                u[i] = seeded_uniform(s.params.seed, s.num_output_tokens)
        return u


def _mask(x: torch.Tensor, seqs: list[ScheduledSeq]) -> None:
    """Ban each row's masked tokens (EOS and stop tokens until min_tokens), in place."""
    rows, cols = [], []
    for i, s in enumerate(seqs):
        for t in s.masked_token_ids:
            rows.append(i)
            cols.append(t)
    if rows:
        x[torch.tensor(rows), torch.tensor(cols)] = float("-inf")


def _last_nonzero(w: torch.Tensor) -> torch.Tensor:
    """(R,) index of each row's last entry above 0."""
    n = w.shape[-1]
    pos = torch.arange(n, dtype=torch.long).expand_as(w)
    return torch.where(w > 0, pos, torch.zeros_like(pos)).max(dim=-1).values


def _filter(w: torch.Tensor, seqs: list[ScheduledSeq]) -> bool:
    """Zero, in place, the weights min-p, then top-k, then top-p drop (vLLM's order);
    False when no row filters anything.

    w: (R, V) weights relative to each row's best token (1). Like vLLM, a token tied with
    the last one kept is kept too.
    """
    V = w.shape[-1]
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32)
    filtered = bool((min_p > 0).any())
    if filtered:
        w.masked_fill_(w < min_p.unsqueeze(1), 0.0)  # p >= min_p * p_max
    top_k = [min(s.params.top_k, V) if s.params.top_k > 0 else V for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    rows = [i for i in range(len(seqs)) if top_k[i] < V or top_p[i] < 1.0]
    if not rows:
        return filtered
    idx = torch.tensor(rows)
    sub = w[idx]  # (r, V)
    ks = torch.tensor([top_k[i] for i in rows])
    ps = torch.tensor([top_p[i] for i in rows], dtype=torch.float64)
    with_p = ps < 1.0
    # Candidates enough for every row's top-k, and for most nuclei.
    K = min(
        V,
        max(
            int(ks.max()) if bool((ks < V).any()) else 0,
            _TOP_P_CANDIDATES if bool(with_p.any()) else 0,
        ),
    )
    ks = ks.clamp(max=K)
    vals = sub.topk(K, dim=-1).values.double()  # (r, K), best first
    ranks = torch.arange(K).unsqueeze(0)
    vals = vals * (ranks < ks.unsqueeze(1))  # top-k
    thresh = vals.gather(1, (ks - 1).unsqueeze(1))
    if bool(with_p.any()):
        # mass of what top-k kept: all of it is among the candidates when top-k is set
        total = torch.where(ks < V, vals.sum(-1), sub.double().sum(-1))
        before = vals.cumsum(-1) - vals  # mass of the better candidates
        inside = (before < (ps * total).unsqueeze(1)) & (vals > 0)
        last = torch.where(inside, ranks, torch.zeros_like(ranks)).max(-1).values
        thresh = torch.where(with_p.unsqueeze(1), vals.gather(1, last.unsqueeze(1)), thresh)
        # A nucleus wider than the candidates: those rows sort their whole vocabulary.
        wide = with_p & (vals.sum(-1) < ps * total)
        if bool(wide.any()):
            full = sub[wide].double().sort(dim=-1, descending=True).values
            before = full.cumsum(-1) - full
            n_in = (before < (ps[wide] * total[wide]).unsqueeze(1)).sum(-1)
            thresh[wide] = full.gather(1, (n_in - 1).unsqueeze(1))
    sub.masked_fill_(sub < thresh.float(), 0.0)
    w[idx] = sub
    return True

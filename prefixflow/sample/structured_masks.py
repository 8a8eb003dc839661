"""Each structured sequence's matcher, and its allowed tokens masked into a step's logits.

A matcher follows its sequence's output: before each draw it consumes the tokens the
sequence gained since (read from the context the scheduler sends), so it needs no word
from the scheduler about what was kept; a sequence preempted or resumed from a partial
output gets a new matcher that replays its output. The masks of the step's structured rows
are computed by llguidance on its own threads, then applied at once.
"""

from __future__ import annotations

import logging

import llguidance
import numpy as np
import torch

from prefixflow.step import ScheduledSeq
from prefixflow.structured.compiler import GrammarCompiler

logger = logging.getLogger("prefixflow")


class StructuredMasks:
    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._executor = llguidance.LLExecutor(max(1, torch.get_num_threads()))
        self._matchers: dict[str, tuple[llguidance.LLMatcher, int]] = {}  # id -> (m, consumed)

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._matchers.pop(rid, None)

    def apply(self, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """logits (S, V) with every token each structured row's grammar forbids next set to
        -inf: a float32 copy, or logits itself when no row is structured.

        A row whose grammar has ended (only EOS left) is left unmasked, as vLLM does, when
        the request will not stop there (ignore_eos, or EOS banned until min_tokens).
        """
        rows = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not rows:
            return logits
        V = logits.shape[1]
        words = (V + 31) // 32
        bits = np.zeros((len(rows), words), dtype=np.int32)
        jobs = [(self._advanced(seqs[i]), j) for j, i in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(jobs, bits.ctypes.data, words * 4, len(rows))
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :V]
        banned = torch.from_numpy(allowed).view(torch.bool).logical_not_()  # (R, V)
        for j, i in enumerate(rows):
            s, matcher = seqs[i], jobs[j][0]
            usable = ~banned[j]
            if s.masked_token_ids:  # the sampler bans these anyway (min_tokens)
                usable[torch.tensor(sorted(s.masked_token_ids))] = False
            done = matcher.is_stopped() and s.params.ignore_eos
            if done or not bool(usable.any()):  # the grammar has done its part
                banned[j] = False
        out = logits.to(torch.float32, copy=True)
        index = torch.tensor(rows)
        out[index] = out[index].masked_fill_(banned, float("-inf"))
        return out

    def _advanced(self, s: ScheduledSeq) -> llguidance.LLMatcher:
        """s's matcher, having consumed its output so far."""
        output = (s.context_token_ids or [])[s.num_prompt_tokens :]
        m, consumed = self._matchers.get(s.request_id, (None, 0))
        if m is None or consumed > len(output):
            m, consumed = self.compiler.matcher(s.params.structured_outputs), 0
        if consumed < len(output) and not m.is_stopped():
            if not m.consume_tokens(output[consumed:]):
                logger.warning(
                    "structured output of %s: the grammar refused its output (%s)",
                    s.request_id,
                    m.get_error(),
                )
        self._matchers[s.request_id] = (m, len(output))
        return m

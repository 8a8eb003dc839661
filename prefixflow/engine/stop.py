"""When a sequence stops: EOS, stop tokens, max_tokens, the model's context, stop strings."""

from __future__ import annotations

from prefixflow.request import FinishReason, Request


def check_token_stop(req: Request) -> tuple[FinishReason, int | None] | None:
    """After a token was appended: should the request stop, and why (reason, stop token)."""
    p = req.sampling_params
    last = req.token_ids[-1]
    if req.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and last in req.eos_token_ids:
            return FinishReason.STOP, None
        if last in p.stop_token_ids:
            return FinishReason.STOP, last
    if req.num_output_tokens >= req.max_output_tokens:
        return FinishReason.LENGTH, None
    return None


def find_stop_string(text: str, stops: list[str], search_from: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in text[search_from:], as (index in text, stop string)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, search_from)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best

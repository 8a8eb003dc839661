"""Prompt lookup (n-gram) drafting: the tokens that followed the context's last n tokens
the last time they appeared in the prompt or the output so far.

Outputs that copy from their input (extraction, correction, quoting) repeat long runs of
it, so the continuation of the latest earlier match is a good guess. The search runs on
the token ids as bytes (`bytes.rfind`, in C), longest n first. Torch-free.
"""

from __future__ import annotations

from array import array

_W = array("i").itemsize


def propose_ngram(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens,
    for the largest n in [n_min, n_max] that has one; [] if none does."""
    L = len(tokens)
    if k <= 0 or L < 2:
        return []
    buf = array("i", tokens).tobytes()
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        pattern = buf[(L - n) * _W :]
        # An occurrence that ends before the last token, so at least one token follows it.
        end = (L - 1) * _W
        pos = buf.rfind(pattern, 0, end)
        while pos >= 0 and pos % _W:  # a match across token boundaries: look further back
            pos = buf.rfind(pattern, 0, pos + len(pattern) - 1)
        if pos >= 0:
            start = pos // _W + n
            return tokens[start : start + k]
    return []

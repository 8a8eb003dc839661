"""GrammarCompiler: the model's tokenizer as llguidance sees it (built once, about 0.3 s),
and each StructuredOutputs' grammar, checked and compiled into a matcher once; each
request gets a copy of that matcher (a twentieth of the cost of building one)."""

from __future__ import annotations

from collections import OrderedDict

import llguidance
import llguidance.hf

from prefixflow.errors import INVALID_VALUE, RequestError
from prefixflow.structured.spec import StructuredOutputs
from prefixflow.tokenizer import TextCodec

_CACHED = 1024  # distinct specs kept compiled, least recently used dropped first


class GrammarCompiler:
    def __init__(self, codec: TextCodec, vocab_size: int, eos_token_ids: list[int]) -> None:
        with codec.lock:  # the server tokenizes on another thread
            self.tokenizer = llguidance.hf.from_tokenizer(
                codec.tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids)
            )
        self._compiled: OrderedDict[StructuredOutputs, llguidance.LLMatcher] = OrderedDict()
        self.num_compiled = 0  # specs compiled (the rest came from the cache)

    def check(self, spec: StructuredOutputs) -> None:
        """Compile spec (once). Raises RequestError saying what is wrong with it."""
        self._pristine(spec)

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """A fresh matcher at the start of spec's grammar."""
        return self._pristine(spec).deep_copy()

    def _pristine(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        found = self._compiled.get(spec)
        if found is not None:
            self._compiled.move_to_end(spec)
            return found
        try:
            grammar = spec.llguidance_grammar()
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
            matcher = None if error else llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if matcher is not None and matcher.is_error():
                error = matcher.get_error()
        except RequestError:
            raise
        except Exception as e:  # whatever llguidance makes of bad input is this request's error
            error = str(e) or type(e).__name__
        if error:
            raise RequestError(
                f"invalid structured output: {error}", "structured_outputs", INVALID_VALUE
            )
        self.num_compiled += 1
        self._compiled[spec] = matcher
        if len(self._compiled) > _CACHED:
            self._compiled.popitem(last=False)
        return matcher

"""GrammarCompiler: the model's tokenizer as llguidance sees it (built once, about 0.3 s),
and each StructuredOutputs' grammar, checked once and cached."""

from __future__ import annotations

import llguidance
import llguidance.hf

from prefixflow.errors import INVALID_VALUE, RequestError
from prefixflow.structured.spec import StructuredOutputs


class GrammarCompiler:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        self._grammars: dict[StructuredOutputs, str] = {}
        self.num_compiled = 0  # distinct specs compiled (the rest came from the cache)

    def grammar(self, spec: StructuredOutputs) -> str:
        """The checked grammar of spec. Raises RequestError saying what is wrong with it."""
        found = self._grammars.get(spec)
        if found is not None:
            return found
        try:
            grammar = spec.llguidance_grammar()
        except ValueError as e:
            raise RequestError(
                f"invalid structured output: {e}", "structured_outputs", INVALID_VALUE
            ) from e
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise RequestError(
                f"invalid structured output: {error}", "structured_outputs", INVALID_VALUE
            )
        self.num_compiled += 1
        self._grammars[spec] = grammar
        return grammar

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.grammar(spec), log_level=0)

"""Structured outputs: decoding constrained to a JSON schema, a regex, a choice or a
grammar, with llguidance computing each step's allowed tokens."""

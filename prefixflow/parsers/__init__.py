"""Parsers of chat outputs: reasoning (<think>...</think>) and tool calls, as vLLM's
--reasoning-parser and --tool-call-parser name them. Pure text functions, no engine."""

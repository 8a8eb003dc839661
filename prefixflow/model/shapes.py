"""Shape facts read off a Hugging Face config (torch-free)."""


def head_dim_of(cfg) -> int:
    """Per-head width: an explicit head_dim where the config has one (Qwen3-style), else
    hidden_size / num_attention_heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

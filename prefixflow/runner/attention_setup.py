"""The one place the engine's options become the attention backends' own configuration."""

from __future__ import annotations

from prefixflow.attention.attention_config import AttentionConfig
from prefixflow.config import EngineConfig


def attention_config(config: EngineConfig) -> AttentionConfig:
    return AttentionConfig(
        backend=config.attention_backend,
        use_kernels=config.attention_kernels,
        shared_prefix_min_tokens=config.shared_prefix_min_tokens,
        shared_prefix_min_part_tokens=config.shared_prefix_min_part_tokens,
        reuse_gather_buffers=config.reuse_gather_buffers,
        kernel_query_blocks=config.attention_query_blocks,
        kernel_fast_exp=config.attention_fast_exp,
        kernel_merge=config.attention_kernel_merge,
    )

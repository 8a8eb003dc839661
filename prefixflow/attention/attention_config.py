"""AttentionConfig: what the attention backends read of the engine's options.

The backends see only this, never the whole EngineConfig, so attention/ stays independent
of the engine's configuration; the runner builds it (runner/attention_setup.py).
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionConfig:
    backend: str  # a name in attention/registry.py
    # The C++ kernels that read KV pages in place, where they were built (off: PyTorch).
    use_kernels: bool
    # A shared prefix gets its own part only if it spares this many token reads per step
    # ((sharers - 1) x its tokens) and is at least min_part_tokens long.
    shared_prefix_min_tokens: int
    shared_prefix_min_part_tokens: int
    # The PyTorch paths copy pages into buffers kept from step to step.
    reuse_gather_buffers: bool
    # The C++ kernel: query blocks a unit takes per read of its keys, and bfloat16's
    # cheaper exp (kernels.KernelTuning).
    kernel_query_blocks: int = 8
    kernel_fast_exp: bool = True
    kernel_merge: bool = True  # shared parts merge inside the kernel

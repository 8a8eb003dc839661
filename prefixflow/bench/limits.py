"""What the machine allows: peak matmul rate and memory bandwidth, and the least work a
workload needs, so an engine's throughput can be read as a fraction of the limit.

The minimum counts each shared prefix once: its FLOPs once (prefill), and its KV read once
per decode step for all the sequences that share it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_hf_config(cls, cfg) -> ModelShape:
        from prefixflow.model.shapes import head_dim_of

        head_dim = head_dim_of(cfg)
        return cls(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size,
        )

    @property
    def matmul_params(self) -> int:
        """Weights each token multiplies through (lm_head included, embeddings excluded)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = (
            self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        )
        return self.layers * per_layer + self.hidden * self.vocab

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class WorkloadMinimum:
    flops: float
    bytes: float

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """Roofline lower bound: the slower of computing and moving the data."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def workload_minimum(
    shape: ModelShape,
    dtype_bytes: int,
    computed_tokens: int,
    attention_pairs: int,
    decode_steps: int,
    kv_token_reads: int,
) -> WorkloadMinimum:
    """Least FLOPs and bytes for a workload.

    computed_tokens: distinct prompt tokens (each shared prefix once) plus output tokens.
    attention_pairs: sum over computed tokens of the context each attends to.
    decode_steps: forward passes that must read all weights (at least the longest output).
    kv_token_reads: sum over decode steps of distinct KV tokens live in that step.
    """
    flops = 2.0 * shape.matmul_params * computed_tokens
    flops += 4.0 * shape.layers * shape.heads * shape.head_dim * attention_pairs
    weight_bytes = (shape.matmul_params + shape.layers * 2 * shape.hidden) * dtype_bytes
    data = (
        weight_bytes * max(decode_steps, 1) + shape.kv_bytes_per_token(dtype_bytes) * kv_token_reads
    )
    return WorkloadMinimum(flops, float(data))


def measure_matmul_flops(
    dtype_name: str = "bfloat16", n: int = 2048, seconds: float = 1.0
) -> float:
    """Dense square matmul rate of this machine, FLOP/s, with torch's own threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2.0 * n**3 * count / (time.perf_counter() - t0)


def measure_bandwidth(megabytes: int = 1024, seconds: float = 1.0) -> float:
    """Memory read bandwidth, bytes/s: a reduction over a buffer far larger than the caches."""
    import torch

    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    x.sum()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.sum()
        count += 1
    return x.numel() * 4.0 * count / (time.perf_counter() - t0)

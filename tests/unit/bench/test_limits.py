"""The workload minimum: parameter counts and roofline arithmetic."""

from __future__ import annotations

import pytest

from prefixflow.bench.limits import ModelShape, workload_minimum


def tiny_shape() -> ModelShape:
    return ModelShape(
        layers=2, hidden=8, heads=4, kv_heads=2, head_dim=2, intermediate=16, vocab=10
    )


def test_matmul_params_equal_the_models_linear_weights():
    from transformers import LlamaConfig

    from prefixflow.model.registry import build_model

    cfg = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = build_model(cfg)
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    linear += model.lm_head.weight.numel()
    assert ModelShape.from_hf_config(cfg).matmul_params == linear == tiny_shape().matmul_params


def test_minimum_counts_flops_per_token_and_bytes_per_step():
    s = tiny_shape()
    base = workload_minimum(
        s, 2, computed_tokens=100, attention_pairs=0, decode_steps=1, kv_token_reads=0
    )
    assert base.flops == 2 * s.matmul_params * 100
    more = workload_minimum(
        s, 2, computed_tokens=200, attention_pairs=50, decode_steps=3, kv_token_reads=40
    )
    assert more.flops == 2 * s.matmul_params * 200 + 4 * 2 * 4 * 2 * 50
    weights = (s.matmul_params + 2 * 2 * 8) * 2
    assert more.bytes == 3 * weights + 40 * s.kv_bytes_per_token(2)
    assert s.kv_bytes_per_token(2) == 2 * 2 * 2 * 2 * 2


def test_roofline_seconds_is_the_slower_bound():
    m = workload_minimum(tiny_shape(), 2, 1000, 0, 1, 0)
    assert m.seconds(peak_flops=1e30, bandwidth=1.0) == pytest.approx(m.bytes)
    assert m.seconds(peak_flops=1.0, bandwidth=1e30) == pytest.approx(m.flops)

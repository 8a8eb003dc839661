"""Quantized layers (quantization=): each kernel against its PyTorch reference, GGUF's
4-bit blocks kept with no loss, a quantized model's outputs with kernels on and off, and
clear errors for what is not supported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

from prefixflow import LLM
from prefixflow.config import QUANTIZATION_MODES
from prefixflow.model.quant import MODES, quantize_model
from prefixflow.model.quant.auto import AutoLinear
from prefixflow.model.quant.gguf_codes import decode_blocks
from prefixflow.model.quant.int4 import Int4Linear
from prefixflow.model.quant.int8 import (
    Int8Linear,
    Int8TokenLinear,
    Int8WeightOnlyLinear,
    quantize_per_channel,
)
from prefixflow.model.quant.linear import QuantLinear
from tests.gguf_export import write_gguf
from tests.model_folders import greedy_ids, tiny_llama_folder

LAYERS = {
    "int8": lambda w: Int8Linear.from_float(w, None),
    "int8_per_token": lambda w: Int8TokenLinear(w, None),
    "int8_weight_only": lambda w: Int8WeightOnlyLinear(w, None),
    "int4": lambda w: Int4Linear.from_float(w, None),
    "auto": lambda w: AutoLinear(w, None),
}


def test_the_config_and_the_quant_package_name_the_same_modes():
    assert QUANTIZATION_MODES == MODES


@pytest.mark.parametrize("rows", [1, 8, 40])  # 40: above DENSE_ABOVE_ROWS, the dense path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_each_kernel_equals_its_reference_within_rounding(kind, dtype, rows):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(rows, 128, generator=gen).to(dtype)
    layer = LAYERS[kind](w)
    layer.kernels = True
    got = layer(x)
    layer.kernels = False
    want = layer(x)
    assert got.dtype == want.dtype == dtype and got.shape == (rows, 96)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max())
    # and the reference is the float layer up to its quantization error
    exact = x.float() @ w.T
    err = (want.float() - exact).abs().max() / exact.abs().max()
    assert err < {"int4": 0.15, "auto": 0.15}.get(kind, 0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_per_token_kernel_equals_its_reference_bit_for_bit(dtype):
    """csrc/int8_gemm.cpp rounds where the PyTorch path rounds: every row count of its
    micro-kernel (1 to 6, and more), channels that fill no 64-channel group."""
    from prefixflow.model.quant.int8 import vnni_kernel_available

    if not vnni_kernel_available():
        pytest.skip("the C++ kernels were not built with AVX-512 VNNI on this machine")
    gen = torch.Generator().manual_seed(3)
    for rows, k, n in [(1, 576, 960), (5, 64, 17), (7, 128, 100), (13, 1536, 200), (64, 96, 64)]:
        layer = Int8TokenLinear(torch.randn(n, k, generator=gen) * 0.05, None)
        assert layer.vnni is not None
        x = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
        assert torch.equal(layer.kernel(x), layer.reference(x)), (rows, k, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer_of", [Int4Linear.from_float, Int8Linear.from_float])
def test_the_block_kernel_equals_its_reference_bit_for_bit(dtype, layer_of):
    """csrc/block_gemm.cpp against the PyTorch path, 4- and 8-bit codes: 1 to 4 rows of its
    micro-kernels and more, channels that fill no 64-channel group, K of one group and of
    many."""
    from prefixflow.model.quant.block_layout import kernel_available

    if not kernel_available():
        pytest.skip("the C++ kernels were not built with AVX-512 VNNI on this machine")
    gen = torch.Generator().manual_seed(4)
    for rows, k, n in [(1, 576, 960), (2, 32, 17), (3, 128, 100), (13, 1536, 200)]:
        layer = layer_of(torch.randn(n, k, generator=gen) * 0.05, None)
        x = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
        assert torch.equal(layer.kernel(x), layer.reference(x)), (rows, k, n)


def test_int8_codes_and_scales_round_trip_through_the_layout():
    w = torch.randn(70, 64, generator=torch.Generator().manual_seed(5))
    layer = Int8Linear.from_float(w, None)
    q, scale = quantize_per_channel(w)
    assert torch.equal(layer.codes().to(torch.int16) - 128, q.to(torch.int16))
    torch.testing.assert_close(layer.dequantized(torch.float32), q.float() * scale[:, None])


def test_auto_takes_int4_or_int8_by_the_rows_of_the_step():
    from prefixflow.model.quant import auto

    layer = AutoLinear(torch.randn(64, 128), None)
    auto._choice[(128, 64, torch.float32)] = (False,) * 3 + (True,) * (len(auto.ROWS) - 3)
    try:  # int4 up to 4 rows, int8 from 8 (ROWS: 1, 2, 4, 8, ...)
        assert layer.pick(torch.zeros(4, 128)) is layer.int4
        assert layer.pick(torch.zeros(5, 128)) is layer.int8
        assert layer.pick(torch.zeros(1000, 128)) is layer.int8
    finally:
        del auto._choice[(128, 64, torch.float32)]


def test_a_bias_and_leading_dimensions_pass_through():
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen)
    x = torch.randn(2, 3, 64, generator=gen)
    for layer in (
        Int8Linear.from_float(w, b),
        Int8TokenLinear(w, b),
        Int8WeightOnlyLinear(w, b),
        Int4Linear.from_float(w, b),
    ):
        y = layer(x)
        assert y.shape == (2, 3, 32)
        ref = torch.nn.functional.linear(
            x, layer.dequantized(torch.float32) if hasattr(layer, "dequantized") else w, b
        )
        assert (y - ref).abs().max() < 0.2 * ref.abs().max()


def test_int4_codes_round_trip_through_the_nibbles():
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 64), generator=gen, dtype=torch.uint8)
    layer = Int4Linear(codes, torch.ones(8, 2), torch.zeros(8, 2), None)
    assert torch.equal(layer.codes(), codes)
    assert torch.equal(layer.dequantized(torch.float32), codes.float() - 8)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_gguf_4bit_blocks_decode_to_exactly_the_dequantised_values(qtype):
    w = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    raw = quants.quantize(w, qtype)
    _check_decode(qtype, raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]))


def test_gguf_q4_k_blocks_decode_to_exactly_the_dequantised_values():
    # gguf's Python package cannot quantize Q4_K: random blocks with sane scales
    rng = np.random.default_rng(0)
    size = GGML_QUANT_SIZES[T.Q4_K][1]
    raw = rng.integers(0, 256, (12, size), dtype=np.uint8)
    raw[:, :4] = np.frombuffer(np.tile(np.float16([0.01, 0.02]), 12).tobytes(), np.uint8).reshape(
        12, 4
    )
    _check_decode(T.Q4_K, raw)


def _check_decode(qtype, blocks: np.ndarray) -> None:
    want = quants.dequantize(blocks, qtype).reshape(-1, 32)
    codes, scale, zero = decode_blocks(qtype, blocks)
    got = (codes.reshape(-1, 32).astype(np.float32) - 8) * scale.reshape(-1, 1) + zero.reshape(
        -1, 1
    )
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def tiny_llama_gguf(tokenizer, tmp_path_factory) -> Path:
    """A tiny llama (q/k rows in llama.cpp's order) as a GGUF file with Q4_0 attention,
    Q4_1 MLP but a Q8_0 down projection, and a Q8_0 output head."""
    folder = tiny_llama_folder(tokenizer, tmp_path_factory.mktemp("tiny-llama-q"))

    def qtype(name: str):
        if name.startswith("output.") or "ffn_down" in name:
            return T.Q8_0
        if "attn_" in name:
            return T.Q4_0
        if "ffn_" in name:
            return T.Q4_1
        return None  # token_embd stays F32

    return write_gguf(folder, folder / "model.gguf", quantize=qtype)


def test_gguf_mode_keeps_4bit_layers_exactly_and_the_rest_as_int8(tiny_llama_gguf):
    from prefixflow.model.loader import iter_weights, load_hf_config, resolve_model
    from prefixflow.model.registry import build_model

    src = resolve_model(str(tiny_llama_gguf))
    cfg = load_hf_config(src)
    model = build_model(cfg)
    model.load_weights(iter_weights(src, cfg))
    model = model.float().eval()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    counts = quantize_model(model, "gguf", src.path)
    # qkv and o (Q4_0), gate_up (Q4_1) of each layer: int4; down (Q8_0) and the head: int8
    assert counts == {"int4": 6, "int8": 3}
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):  # the GGUF's own values, q/k rows reordered: no loss
            # (but for the float32 rounding of the zero the kernel keeps, z - 8 s)
            want = dense[name]
            torch.testing.assert_close(m.dequantized(torch.float32), want, rtol=0, atol=1e-6)
    assert isinstance(model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)


@pytest.mark.parametrize("mode", ["gguf", "int8", "int8_per_token", "int4", "auto"])
def test_a_quantized_model_generates_the_same_with_kernels_on_and_off(tiny_llama_gguf, mode):
    on = LLM(
        model=str(tiny_llama_gguf), dtype="float32", quantization=mode, kv_cache_memory="64MiB"
    )
    off = LLM(
        model=str(tiny_llama_gguf),
        dtype="float32",
        quantization=mode,
        quant_kernels=False,
        kv_cache_memory="64MiB",
    )
    assert any(isinstance(m, QuantLinear) for m in on.engine.runner.model.modules())
    assert greedy_ids(on) == greedy_ids(off)


def test_quantization_is_off_by_default_and_named_modes_are_checked(tiny_llama_gguf):
    llm = LLM(model=str(tiny_llama_gguf), dtype="float32", kv_cache_memory="64MiB")
    assert not any(isinstance(m, QuantLinear) for m in llm.engine.runner.model.modules())
    with pytest.raises(ValueError, match="int8_weight_only"):
        LLM(model=str(tiny_llama_gguf), quantization="fp4")


def test_gguf_mode_on_a_safetensors_model_says_what_to_use(tiny_llama_gguf):
    with pytest.raises(ValueError, match="not a .gguf file.*int8"):
        LLM(model=str(tiny_llama_gguf.parent), quantization="gguf", kv_cache_memory="64MiB")


def test_quantized_weights_change_the_kv_fingerprint(tiny_llama_gguf):
    from prefixflow.runner.kv_disk import kv_fingerprint_of

    prints = set()
    for mode in ("none", "gguf", "int8"):
        llm = LLM(
            model=str(tiny_llama_gguf), dtype="float32", quantization=mode, kv_cache_memory="64MiB"
        )
        prints.add(kv_fingerprint_of(llm.engine.runner.model, torch.float32, 16))
    assert len(prints) == 3


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_moe_experts_are_quantized_and_the_router_is_not(tokenizer, tmp_path, mode):
    from tests.family_models import build_family_model

    folder = tmp_path / "mixtral"
    build_family_model("mixtral", folder, tokenizer)
    on = LLM(model=str(folder), dtype="float32", quantization=mode, kv_cache_memory="64MiB")
    model = on.engine.runner.model
    moe = model.layers[0].mlp
    assert isinstance(moe.gate, torch.nn.Linear)  # the router keeps its weights
    assert all(isinstance(e.gate_up_proj, QuantLinear) for e in moe.experts)
    off = LLM(
        model=str(folder),
        dtype="float32",
        quantization=mode,
        quant_kernels=False,
        kv_cache_memory="64MiB",
    )
    assert greedy_ids(on) == greedy_ids(off)


def test_a_quantized_engine_refuses_weight_updates_and_keeps_serving(tiny_llama_gguf):
    llm = LLM(
        model=str(tiny_llama_gguf), dtype="float32", quantization="gguf", kv_cache_memory="64MiB"
    )
    before = greedy_ids(llm)
    with pytest.raises(ValueError, match="re-quantize"):
        llm.update_weights(str(tiny_llama_gguf))
    assert greedy_ids(llm) == before

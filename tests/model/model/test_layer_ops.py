"""The fused (1 + w) norm of Gemma and OLMo 2 against its PyTorch path."""

from __future__ import annotations

import pytest
import torch

from prefixflow import native
from prefixflow.model.ops import LayerOps


@pytest.mark.skipif(not native.available(), reason="the C++ kernels are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fused_offset_norm_equals_pytorch(dtype, offset):
    torch.manual_seed(0)
    x = torch.randn(37, 1152).to(dtype)
    res = torch.randn(37, 1152).to(dtype)
    w = (0.3 * torch.randn(1152)).to(dtype)
    fused, plain = LayerOps(fused=True), LayerOps(fused=False)
    assert fused.fused
    res_a, res_b = res.clone(), res.clone()
    a = fused.offset_rms_norm(x, w, 1e-6, offset, res_a)
    b = plain.offset_rms_norm(x, w, 1e-6, offset, res_b)
    assert torch.equal(res_a, res_b)  # the residual stream: x + residual, in place
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: at most a rounding apart
    assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
    alone = plain.offset_rms_norm(x, w, 1e-6, offset).float()
    got = fused.offset_rms_norm(x, w, 1e-6, offset).float()
    assert torch.allclose(got, alone, rtol=tol, atol=tol)

"""The layers of the shared decoder: RMSNorm, attention and the gated MLP, with the
switches of model/arch.py.

Tokens of all sequences in a step are flattened into one axis T; attention finds each
token's sequence, position and KV pages in the backend's metadata for the step, so the
layers have no notion of batch or padding.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixflow.attention.backend import AttentionBackend, M
from prefixflow.model.arch import DecoderArch, LayerSpec
from prefixflow.model.ops import LayerOps
from prefixflow.model.rope import RotaryEmbedding
from prefixflow.model.shapes import head_dim_of


class RMSNorm(nn.Module):
    def __init__(
        self, dim: int, eps: float, ops: LayerOps, offset: float = 0.0, float32_weight: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops
        self.offset = offset
        self.float32_weight = float32_weight or bool(offset)

    @classmethod
    def of(cls, dim: int, eps: float, ops: LayerOps, arch: DecoderArch) -> RMSNorm:
        """The family's norm (arch.py: its offset, and where its weight multiplies)."""
        return cls(dim, eps, ops, arch.norm_offset, arch.norm_weight_in_float32)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of x, or of x + residual (residual is then updated to that sum)."""
        if self.float32_weight:
            return self.ops.offset_rms_norm(x, self.weight, self.eps, self.offset, residual)
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg, arch: DecoderArch, spec: LayerSpec, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul: fewer, larger GEMMs are faster on every backend
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        # What the attention backend reads of this layer (attention/backend.py).
        self.scale = arch.attn_scale or self.head_dim**-0.5
        self.window = spec.window
        self.softcap = arch.attn_softcap
        self.rope = spec.rope
        self.clip = arch.clip_qkv
        self.qk_norm = arch.qk_norm
        if arch.qk_norm is not None:
            q_dim, k_dim = (
                (self.head_dim, self.head_dim)
                if arch.qk_norm == "head"
                else (self.q_size, self.kv_size)
            )
            eps = cfg.rms_norm_eps
            self.q_norm = RMSNorm.of(q_dim, eps, ops, arch)
            self.k_norm = RMSNorm.of(k_dim, eps, ops, arch)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        ropes: dict[str, RotaryEmbedding],
        positions: torch.Tensor,  # (T,)
        meta: M,  # the backend's metadata for this step
        kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D)
        backend: AttentionBackend[M],
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.clip is not None:  # OLMoE: after its norms
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, H_kv, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            rope = ropes[self.rope]
            if rope.dim == self.head_dim:
                self.ops.rotary(q, k, positions, rope.cos, rope.sin)  # in place
            else:  # partial rotary (Phi-3): the first rope.dim dimensions of each head
                self.ops.rotary(
                    q[..., : rope.dim], k[..., : rope.dim], positions, rope.cos, rope.sin
                )
        o = backend.forward(self, q, k, v, kv_cache, meta)  # (T, H, D)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.act = act
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))

    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.act == "gelu_tanh":
            return self.ops.gelu_tanh_and_mul(gate_up)
        return self.ops.silu_and_mul(gate_up)

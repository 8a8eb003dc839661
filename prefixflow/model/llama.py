"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Tokens of all sequences in a step are flattened into one axis T; attention finds each
token's sequence, position and KV pages in the backend's metadata for the step, so the
model itself has no notion of batch or padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from prefixflow.attention.backend import AttentionBackend, M
from prefixflow.model.ops import LayerOps
from prefixflow.model.rope import RotaryEmbedding
from prefixflow.model.shapes import head_dim_of


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: LayerOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of x, or of x + residual (residual is then updated to that sum)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul: fewer, larger GEMMs are faster on every backend
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        rope: RotaryEmbedding,
        positions: torch.Tensor,  # (T,)
        meta: M,  # the backend's metadata for this step
        kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D)
        backend: AttentionBackend[M],
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, H_kv, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        self.ops.rotary(q, k, positions, rope.cos, rope.sin)  # in place
        o = backend.forward(self, q, k, v, kv_cache, meta)  # (T, H, D)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, ops: LayerOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, qkv_bias, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        residual: torch.Tensor | None,  # (T, hidden)
        rope: RotaryEmbedding,
        positions: torch.Tensor,  # (T,)
        meta: M,
        kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D)
        backend: AttentionBackend[M],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's output; residual: the stream it adds to (None at the
        first layer, where x is the stream). Returns this layer's MLP output and the stream."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)  # residual += x, then the norm
        h = self.self_attn(h, rope, positions, meta, kv_cache, backend)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer with RMSNorm, rotary positions, GQA and a SwiGLU MLP."""

    def __init__(self, cfg, qkv_bias: bool = False) -> None:
        super().__init__()
        self.config = cfg
        # One set of elementwise operations for every layer: PyTorch until use_fused_ops.
        self.ops = LayerOps(fused=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, qkv_bias, self.ops) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        meta: M,  # the backend's metadata for this step (its prepare())
        kv_caches: torch.Tensor,  # (L, 2, num_pages, H_kv, page_size * D)
        backend: AttentionBackend[M],
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, self.rope, positions, meta, kv_caches[i], backend)
        return self.norm(x, residual)

    def use_fused_ops(self, fused: bool) -> None:
        """RMSNorm, residual adds, SiLU x up and rotary embedding: fused C++ or PyTorch."""
        self.ops.fused = LayerOps(fused).fused

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (S, vocab) in the model's dtype

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in Hugging Face checkpoints, fusing q/k/v and gate/up."""
        loaded: set[str] = set()
        with torch.no_grad():
            for name, dst, src in self._placed(weights):
                dst.copy_(src)
                loaded.add(name)
        missing = sorted(self._expected_loads() - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {missing[:5]} ...")

    def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], require_all: bool = False
    ) -> int:
        """Replace some (or, with require_all, all) weights in place; returns how many
        tensors it copied.

        Every name and shape is checked before the first copy, so a bad tensor leaves
        the model as it was.
        """
        staged = list(self._placed(weights))
        if require_all:
            missing = sorted(self._expected_loads() - {key for key, _, _ in staged})
            if missing:
                raise ValueError(f"the new weights lack tensors: {missing[:5]} ...")
        with torch.no_grad():
            for _, dst, src in staged:
                dst.copy_(src)
        return len(staged)

    def _placed(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(load key, the parameter or its q/k/v or gate/up slice, the tensor) per tensor,
        after checking that the tensor has a place and its shape."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, shard = name, None
            if len(parts) >= 2 and parts[-2] in fused:
                fused_name, shard = fused[parts[-2]]
                target = ".".join(parts[:-2] + [fused_name, parts[-1]])
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            dst = params[target].detach()  # the same storage, outside autograd
            if shard is not None:
                sizes = self._shard_sizes(target)
                dst = dst.narrow(0, sum(sizes[:shard]), sizes[shard])
            _check_shape(name, dst.shape, tensor.shape)
            yield f"{target}#{shard}", dst, tensor

    def _shard_sizes(self, target: str) -> list[int]:
        if target.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            a = self.layers[0].self_attn
            return [a.q_size, a.kv_size, a.kv_size]
        inter = self.config.intermediate_size
        return [inter, inter]

    def _expected_loads(self) -> set[str]:
        out = set()
        for name, _ in self.named_parameters():
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if ".qkv_proj." in name:
                out |= {f"{name}#{i}" for i in range(3)}
            elif ".gate_up_proj." in name:
                out |= {f"{name}#{i}" for i in range(2)}
            else:
                out.add(f"{name}#None")
        return out


def _check_shape(name: str, want: torch.Size, got: torch.Size) -> None:
    if tuple(want) != tuple(got):
        raise ValueError(f"tensor {name!r} has shape {tuple(got)}, the model expects {tuple(want)}")

"""The shared decoder: every supported family is this model with its switches
(model/arch.py, set per family in model/families.py) over a paged KV cache."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prefixflow.attention.backend import AttentionBackend, M
from prefixflow.model import weights as ckpt
from prefixflow.model.arch import DecoderArch, LayerSpec
from prefixflow.model.layers import MLP, Attention, RMSNorm
from prefixflow.model.moe import SparseMoE
from prefixflow.model.ops import LayerOps
from prefixflow.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg, arch: DecoderArch, spec: LayerSpec, ops: LayerOps) -> None:
        super().__init__()
        self.norms = arch.norms

        def norm() -> RMSNorm:
            return RMSNorm.of(cfg.hidden_size, cfg.rms_norm_eps, ops, arch)

        if arch.norms != "post":
            self.input_layernorm = norm()
        self.self_attn = Attention(cfg, arch, spec, ops)
        # "pre": the norm before the MLP (Hugging Face's name for it); else after attention
        self.post_attention_layernorm = norm()
        if arch.norms == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if arch.norms != "pre":
            self.post_feedforward_layernorm = norm()
        if spec.moe:
            self.mlp = SparseMoE(cfg.hidden_size, arch.moe, arch.act, ops)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, arch.act, ops)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        residual: torch.Tensor | None,  # (T, hidden)
        ropes: dict[str, RotaryEmbedding],
        positions: torch.Tensor,  # (T,)
        meta: M,
        kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D)
        backend: AttentionBackend[M],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's output; residual: the stream it adds to (None at the
        first layer, where x is the stream). Returns this layer's last output, not yet
        added, and the stream: the adds fuse into the next norm."""
        if self.norms == "post":  # OLMo 2: x + norm(attn(x)), then x + norm(mlp(x))
            residual = x if residual is None else residual.add_(x)
            h = self.self_attn(residual, ropes, positions, meta, kv_cache, backend)
            residual.add_(self.post_attention_layernorm(h))
            return self.post_feedforward_layernorm(self.mlp(residual)), residual
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)  # residual += x, then the norm
        h = self.self_attn(h, ropes, positions, meta, kv_cache, backend)
        if self.norms == "pre":
            h = self.post_attention_layernorm(h, residual)
            return self.mlp(h), residual
        # Gemma's sandwich: each sublayer's output is normed before it joins the stream
        h = self.post_attention_layernorm(h)
        h = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class CausalLM(nn.Module):
    """Decoder-only transformer with RMSNorm, rotary positions, GQA and a gated MLP or a
    mixture of experts; the family's quirks are the switches of `arch`."""

    def __init__(self, cfg, arch: DecoderArch) -> None:
        super().__init__()
        self.config = cfg
        self.arch = arch
        # One set of elementwise operations for every layer: PyTorch until use_fused_ops.
        self.ops = LayerOps(fused=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, arch, spec, self.ops) for spec in arch.layers)
        self.norm = RMSNorm.of(cfg.hidden_size, cfg.rms_norm_eps, self.ops, arch)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.ropes = {name: RotaryEmbedding(cfg, layer_type) for name, layer_type in arch.ropes}

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
        if self.arch.embed_scale is not None:  # Gemma: the scale rounded to the dtype first
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, self.ropes, positions, meta, kv_caches[i], backend)
        return self.norm(x, residual)

    def use_fused_ops(self, fused: bool) -> None:
        """RMSNorm, residual adds, SiLU x up and rotary embedding: fused C++ or PyTorch."""
        self.ops.fused = LayerOps(fused).fused

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # (S, vocab) in the model's dtype
        cap = self.arch.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in Hugging Face checkpoints, fusing q/k/v and gate/up."""
        loaded: set[str] = set()
        with torch.no_grad():
            for key, dst, src in ckpt.placed(self, weights, self.tie_word_embeddings):
                dst.copy_(src)
                loaded.add(key)
        missing = ckpt.missing(self, loaded, self.tie_word_embeddings)
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
        staged = list(ckpt.placed(self, weights, self.tie_word_embeddings))
        if require_all:
            missing = ckpt.missing(self, {key for key, _, _ in staged}, self.tie_word_embeddings)
            if missing:
                raise ValueError(f"the new weights lack tensors: {missing[:5]} ...")
        with torch.no_grad():
            for _, dst, src in staged:
                dst.copy_(src)
        return len(staged)

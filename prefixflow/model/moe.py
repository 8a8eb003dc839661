"""A mixture of experts as one step's tokens see it: routed, grouped by expert, and each
expert's group in one GEMM.

A step's T tokens pick k experts each. The T x k (token, expert) pairs are sorted by
expert, so each expert that any token picked runs one gate/up GEMM and one down GEMM over
all of its rows (Python loops over experts, never over tokens), and each expert's weights
are ordinary nn.Linear layers, prepacked for oneDNN like the dense ones (model/prepack.py).
torch._grouped_mm does the same in one call but measured 1.3-1.8x slower than the packed
loop on the CPU (64 experts of OLMoE-1B-7B's shape, 8 to 512 tokens, bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prefixflow.model.arch import MoESpec
from prefixflow.model.layers import MLP
from prefixflow.model.ops import LayerOps


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, spec: MoESpec, act: str, ops: LayerOps) -> None:
        super().__init__()
        self.spec = spec
        self.gate = nn.Linear(hidden, spec.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            MLP(hidden, spec.intermediate_size, act, ops) for _ in range(spec.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        T = x.shape[0]
        k = self.spec.top_k
        # Routing as transformers does it: softmax in float32 over all experts, the top k,
        # optionally renormalised, then back to the model's dtype.
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)  # (T, E)
        weights, experts = torch.topk(probs, k, dim=-1)  # (T, k)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.flatten()  # (T*k,)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        token_of = order // k  # (T*k,) the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        rows = x[token_of]  # (T*k, hidden)
        out_rows = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out_rows[start : start + n] = self.experts[e](rows[start : start + n])
                start += n
        out_rows.mul_(weights.flatten()[order, None])
        return torch.zeros(T, x.shape[1], dtype=x.dtype).index_add_(0, token_of, out_rows)

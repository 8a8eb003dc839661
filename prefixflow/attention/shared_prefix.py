"""Shared-prefix attention: each shared prefix's KV is read once per step for all its sequences.

Hydragen / FlashInfer cascade attention on the CPU. For every shared part of the step
(a run of pages several sequences hold, see prefix_groups.py), the queries of all its
sequences are stacked and attend to the single copy of its KV together. Each sequence also
attends alone to its own pages after its shared parts (causally for a prompt chunk). The
parts are merged exactly by their log-sum-exp in float32 (merge.py). A tree of prefixes
(instruction, document, question) is just more parts.

The work runs on the C++ paged-attention kernel (kernels.py), which reads pages in place,
or, with `attention_kernels` off or the kernel missing, on PyTorch: gathered pages, the
fused CPU flash kernel, and two bfloat16 GEMMs around a softmax for shared parts in
bfloat16 (lse_attention.py). On the kernel a shared part ran 2-3x faster than those GEMMs
and a causal prompt 2x faster than the flash kernel. Everything the step needs (layout,
work lists, page tables, masks) is built once, in `prepare`, for each sliding window of
the model's layers (window.py): a windowed layer drops the parts its sequences' windows
have left behind and reads each sequence's own pages from the first its window sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import torch

from prefixflow.attention import kernels, kv_layout
from prefixflow.attention.attention_config import AttentionConfig
from prefixflow.attention.backend import (
    AttentionBackend,
    AttentionLayer,
    AttentionMetadata,
    AttentionShape,
)
from prefixflow.attention.common import (
    PageGather,
    additive_mask,
    decode_batch,
    fold_gqa,
    unfold_gqa,
)
from prefixflow.attention.lse_attention import attend_causal_with_lse, attend_with_lse
from prefixflow.attention.merge import merge_into
from prefixflow.attention.paged import PagedAttention, PagedPlan
from prefixflow.attention.prefix_groups import (
    PrefixLayout,
    SharedPart,
    plan_prefix_layout,
    window_layout,
)
from prefixflow.attention.step_layout import StepLayout
from prefixflow.attention.window import first_visible, layer_softcap, layer_window, visible


@dataclass
class OwnPrefill:
    """A prompt chunk attending alone to its own pages (PyTorch path)."""

    rows: slice
    pages: torch.Tensor  # (n,) page ids from its first own page
    keys: int  # tokens of context in those pages
    # (G*Q, L) additive; None: its pages start at its first query and no query's window
    # ends inside them (plain causal attention)
    mask: torch.Tensor | None


@dataclass
class OwnTorch:
    """Every sequence's own pages, attended on the PyTorch path."""

    decode_rows: torch.Tensor  # (B,)
    decode_tables: torch.Tensor  # (B, W)
    decode_mask: torch.Tensor  # (B, 1, 1, L) additive
    prefills: list[OwnPrefill]


@dataclass
class Part:
    """One shared part on PyTorch, or one wave of parts with disjoint rows on the kernel."""

    rows: torch.Tensor  # (M,) the stacked query rows of its members
    pages: torch.Tensor | None  # (n,) its page ids (PyTorch)
    work: kernels.KernelWork | None  # on the kernel; None: PyTorch


@dataclass
class SharedPrefixPlan:
    """What the layers of one sliding window read."""

    plain: PagedPlan | None  # nothing shared and no kernel: the plain paged path
    own_work: kernels.KernelWork | None  # own pages on the kernel
    own_torch: OwnTorch | None  # own pages on PyTorch
    parts: list[Part]


@dataclass
class SharedPrefixMetadata(AttentionMetadata):
    step: StepLayout  # for a window the runner did not name (window_plan)
    layout: PrefixLayout  # the shared parts of full attention, which windows trim
    plans: dict[int | None, SharedPrefixPlan]  # by the layers' window (None: full attention)


class SharedPrefixAttention(AttentionBackend[SharedPrefixMetadata]):
    name = "shared_prefix"

    def __init__(
        self,
        shape: AttentionShape,
        *,
        min_shared_tokens: int,
        min_part_tokens: int,
        use_kernels: bool = True,
        reuse_gather_buffers: bool = True,
        tuning: kernels.KernelTuning = kernels.DEFAULT_TUNING,
    ) -> None:
        # A part must spare min_shared_tokens token reads ((members - 1) x tokens) and be
        # min_part_tokens long to be worth its own product and merge; a smaller run is read
        # with what follows it. A part of one 16-token page (a chat template's opening)
        # measured slower than no part at all.
        self.shape = shape
        self.min_shared_tokens = min_shared_tokens
        self.min_part_tokens = min_part_tokens
        self.kernel = kernels.load() if use_kernels else None
        self.tuning = tuning
        self.gather = PageGather(shape.page_size, reuse_gather_buffers)
        self.plain = PagedAttention(shape, reuse_gather_buffers)

    @classmethod
    def from_config(cls, config: AttentionConfig, shape: AttentionShape) -> Self:
        return cls(
            shape,
            min_shared_tokens=config.shared_prefix_min_tokens,
            min_part_tokens=config.shared_prefix_min_part_tokens,
            use_kernels=config.use_kernels,
            reuse_gather_buffers=config.reuse_gather_buffers,
            tuning=kernels.KernelTuning(
                config.kernel_query_blocks, config.kernel_fast_exp, config.kernel_merge
            ),
        )

    # ---- once per step ----
    def prepare(self, step: StepLayout) -> SharedPrefixMetadata:
        layout = plan_prefix_layout(
            [s.pages for s in step.seqs],
            [(s.ctx_len - s.q_len) // step.page_size for s in step.seqs],
            self.min_shared_tokens,
            step.page_size,
            self.min_part_tokens,
        )
        meta = SharedPrefixMetadata(step.slot_mapping, step, layout, {})
        for w in self.shape.windows:
            self.window_plan(meta, w)
        return meta

    def window_plan(self, meta: SharedPrefixMetadata, window: int | None) -> SharedPrefixPlan:
        """The step's plan for `window`; one the shape did not list is built on first use
        and kept for the step's other layers."""
        if window not in meta.plans:
            meta.plans[window] = self._plan(meta.step, meta.layout, window)
        return meta.plans[window]

    def _plan(self, step: StepLayout, layout: PrefixLayout, window: int | None) -> SharedPrefixPlan:
        page_size = step.page_size
        seqs = step.seqs
        if window is not None:
            layout = window_layout(
                layout,
                [first_visible(s.ctx_len - s.q_len, window) for s in seqs],
                [first_visible(s.ctx_len - 1, window) for s in seqs],
                page_size,
            )
        if not layout.parts and self.kernel is None:
            return SharedPrefixPlan(self.plain.plan(step, window), None, None, [])
        own = layout.own_from_page
        own_work = own_torch = None
        if self.kernel is not None:
            own_work = kernels.kernel_work(
                [
                    (
                        s.rows,
                        s.pages[own[i] :],
                        s.ctx_len - own[i] * page_size,
                        s.ctx_len - own[i] * page_size - s.q_len,
                    )
                    for i, s in enumerate(seqs)
                ]
            )
            parts = self._kernel_waves(step, layout.parts)
        else:
            own_torch = self._own_torch(step, own, window)
            parts = [
                Part(
                    torch.tensor([r for i in p.members for r in seqs[i].rows], dtype=torch.long),
                    torch.tensor(p.pages, dtype=torch.long),
                    None,
                )
                for p in layout.parts
            ]
        return SharedPrefixPlan(None, own_work, own_torch, parts)

    def _kernel_waves(self, step: StepLayout, shared: list[SharedPart]) -> list[Part]:
        """The shared parts in as few kernel calls as their rows allow.

        Parts whose rows are disjoint (the groups of one level of a prefix tree) go in one
        call and one merge; a part that shares rows with an earlier one goes in a later
        wave, so each row still merges its parts in their order.
        """
        page_size = step.page_size
        waves: list[list[tuple[list[int], list[int], int, int]]] = []
        last_wave: dict[int, int] = {}  # row -> the wave of its latest part
        for part in shared:
            rows = [r for i in part.members for r in step.seqs[i].rows]
            w = 1 + max((last_wave.get(r, -1) for r in rows), default=-1)
            if w == len(waves):
                waves.append([])
            waves[w].append((rows, part.pages, len(part.pages) * page_size, kernels.SEES_ALL))
            last_wave.update(dict.fromkeys(rows, w))
        return [
            Part(
                torch.tensor([r for e in entries for r in e[0]], dtype=torch.long),
                None,
                kernels.kernel_work(entries),
            )
            for entries in waves
        ]

    def _own_torch(self, step: StepLayout, own: list[int], window: int | None) -> OwnTorch:
        page_size = step.page_size
        g = self.shape.group
        dec = [i for i, s in enumerate(step.seqs) if s.q_len == 1]
        tables, mask = decode_batch(
            [step.seqs[i].pages[own[i] :] for i in dec],
            [own[i] * page_size for i in dec],
            [step.seqs[i].ctx_len - 1 for i in dec],
            window,
            page_size,
        )
        prefills = []
        for i, s in enumerate(step.seqs):
            if s.q_len == 1:
                continue
            first_key = own[i] * page_size
            keys = s.ctx_len - first_key
            m = None
            if keys != s.q_len or (window is not None and window < s.q_len):
                seen = visible(s.q_len, s.ctx_len, window, first_key)
                m = additive_mask(seen.repeat(g, 1), self.shape.dtype)
            prefills.append(
                OwnPrefill(
                    slice(s.q_start, s.q_start + s.q_len),
                    torch.tensor(s.pages[own[i] :], dtype=torch.long),
                    keys,
                    m,
                )
            )
        return OwnTorch(
            torch.tensor([step.seqs[i].q_start for i in dec], dtype=torch.long),
            tables,
            additive_mask(mask[:, None, None, :], self.shape.dtype),
            prefills,
        )

    # ---- once per layer ----
    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # (2, num_pages, H_kv, page_size * D): kv_layout.py
        meta: SharedPrefixMetadata,
    ) -> torch.Tensor:
        page_size = self.shape.page_size
        kv_layout.write(kv_cache, k, v, meta.slot_mapping, page_size, self.kernel is not None)
        scale, window, softcap = layer.scale, layer_window(layer), layer_softcap(layer)
        plan = self.window_plan(meta, window)
        if plan.plain is not None:
            return self.plain.attend(q, kv_cache, plan.plain, scale, softcap)
        T, H, D = q.shape
        out = torch.empty(T, H, D, dtype=torch.float32)
        lse = torch.empty(T, H, dtype=torch.float32)
        if plan.own_work is not None:
            self._kernel(out, lse, q, kv_cache, plan.own_work, scale, window, softcap)
        else:
            self._attend_own_torch(q, kv_cache, plan.own_torch, scale, softcap, out, lse)
        if plan.parts:
            self._attend_parts(q, kv_cache, plan.parts, scale, softcap, out, lse)
        return out.to(q.dtype)

    def _kernel(self, out, lse, q, kv_cache, work, scale, window, softcap, accumulate=False):
        kernels.attend(
            self.kernel,
            out,
            lse,
            q,
            kv_cache,
            self.shape.page_size,
            work,
            scale,
            window,
            softcap,
            self.tuning,
            accumulate,
        )

    def _attend_parts(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        parts: list[Part],
        scale: float,
        softcap: float | None,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        """Each shared part (or wave of parts) merged into its rows' results in order. A part
        lies wholly inside every member query's window: no window here."""
        part_out = part_lse = None
        for part in parts:
            rows = part.rows
            if part.work is not None and self.tuning.merge_in_kernel:
                self._kernel(out, lse, q, kv_cache, part.work, scale, None, softcap, True)
                continue
            if part.work is not None:
                if part_out is None:
                    part_out, part_lse = torch.empty_like(out), torch.empty_like(lse)
                self._kernel(part_out, part_lse, q, kv_cache, part.work, scale, None, softcap)
                o_part, lse_part = part_out[rows], part_lse[rows]
            else:
                h_kv = self.shape.num_kv_heads
                kc, vc = self.gather(kv_cache, part.pages, 1)  # (H_kv, P, D)
                o, s_lse = attend_with_lse(
                    fold_gqa(q[rows], h_kv), kc[None], vc[None], None, scale, softcap
                )
                o_part, lse_part = unfold_gqa(o, s_lse, rows.numel(), h_kv)
            acc_o, acc_lse = out[rows], lse[rows]
            merge_into(acc_o, acc_lse, o_part, lse_part)
            out[rows], lse[rows] = acc_o, acc_lse

    def _attend_own_torch(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        own: OwnTorch,
        scale: float,
        softcap: float | None,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        """Each sequence alone over its own pages, on PyTorch; decodes as one padded batch."""
        H, D = q.shape[1:]
        h_kv = self.shape.num_kv_heads
        g = H // h_kv
        if own.decode_rows.numel():
            B = own.decode_rows.numel()
            kc, vc = self.gather(kv_cache, own.decode_tables, 0)  # (B, H_kv, L, D)
            qd = q[own.decode_rows].view(B, h_kv, g, D)
            o, s_lse = attend_with_lse(qd, kc, vc, own.decode_mask, scale, softcap)
            out[own.decode_rows] = o.reshape(B, H, D).float()
            lse[own.decode_rows] = s_lse.reshape(B, H)
        for p in own.prefills:
            kc, vc = self.gather(kv_cache, p.pages, 0)  # (H_kv, L, D)
            kc, vc = kc[:, : p.keys], vc[:, : p.keys]
            Q = p.rows.stop - p.rows.start
            if p.mask is None:  # a prompt from its start: plain causal attention
                qh = q[p.rows].transpose(0, 1)[None]  # (1, H, Q, D)
                o, s_lse = attend_causal_with_lse(qh, kc[None], vc[None], scale, softcap)
                out[p.rows] = o[0].transpose(0, 1).float()
                lse[p.rows] = s_lse[0].transpose(0, 1)
                continue
            qs = fold_gqa(q[p.rows], h_kv)
            o, s_lse = attend_with_lse(qs, kc[None], vc[None], p.mask, scale, softcap)
            out[p.rows], lse[p.rows] = unfold_gqa(o, s_lse, Q, h_kv)

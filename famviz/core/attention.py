"""Attention over one block's window: [memory blocks | FAM | current block].

In sink mode the memory region starts with the stream's first tokens (``WindowLayout.sink`` of them),
masked exactly like memory; only the statistics count them as a group of their own.

Queries are the block's rows in the order [FAM rows | block tokens]. The mask (docs/algorithm.md §2):

    query \\ key     memory     FAM     block
    FAM rows         masked     all     all (whole block)
    block token i    all        all     causal (j <= i)

Back ends compute the same output:
- ``sdpa`` (default everywhere): PyTorch's fused kernel with the explicit boolean mask;
- ``flex``: FlexAttention with a block mask, compiled once per window shape (a GPU back end; it
  also compiles on CPU, where dense SDPA is faster);
- ``flash``: flash-attn when importable (CUDA only). The table splits into two plain calls: FAM
  rows over [FAM | block] without a mask, block rows over everything with a bottom-right aligned
  causal mask (flash-attn's convention), which is exactly "all memory, all FAM, causal block".
When a trace is recorded, ``attend_with_stats`` runs instead. It never materialises the attention
matrix: each key group (memory, FAM, block) is one fused kernel call that also returns its per-query
log-sum-exp, and the groups are merged exactly (softmax over a union of key sets):

    lse = logsumexp_g(lse_g),  share_g = exp(lse_g - lse),  out = sum_g share_g * out_g

so the shares are exact by construction and cost nothing beyond the attention itself. Only the
FAM rows' per-token probabilities (``fam.read``, fam_len x block per head) are formed explicitly.
``attend_reference_stats`` is the plain explicit-softmax form the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from famviz.core.modes import BLOCK_GROUPS, FAM_GROUPS

if TYPE_CHECKING:
    from collections.abc import Callable

    # kernel(q, k, v, scale, causal) -> out, all (b, heads, n, d)
    Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor]


@dataclass(frozen=True)
class WindowLayout:
    """Sizes of the key groups and query groups of one block's attention.

    Every window row is a key; by default every row also asks (queries [FAM rows | block tokens]). A side
    read of the FAM has no FAM queries (``fam_queries`` False), and finishing a block whose first tokens
    already ran asks only from block token ``first_query`` on: the mask's other rows, unchanged."""

    memory: int  # cached token keys from earlier blocks (the sink tokens included)
    fam: int  # FAM rows (keys; queries too when fam_queries)
    block: int  # tokens of the current block (keys; queries from first_query on)
    sink: int = 0  # of the memory keys, how many (the first) are kept sink tokens
    fam_queries: bool = True
    first_query: int = 0

    @property
    def fam_queried(self) -> int:
        """FAM rows among the queries (the first ones)."""
        return self.fam if self.fam_queries else 0

    @property
    def n_queries(self) -> int:
        return self.fam_queried + self.block - self.first_query

    @property
    def n_keys(self) -> int:
        return self.memory + self.fam + self.block

    @property
    def every_row_queries(self) -> bool:
        return self.fam_queries and not self.first_query


@lru_cache(maxsize=64)
def _window_mask_cpu(layout: WindowLayout) -> torch.Tensor:
    m, f, n = layout.memory, layout.fam, layout.block
    mask = torch.zeros(f + n, m + f + n, dtype=torch.bool)
    mask[:f, m:] = True  # FAM rows: previous FAM and the whole block, never memory
    mask[f:, : m + f] = True  # block tokens: all memory and the FAM
    mask[f:, m + f :] = torch.ones(n, n, dtype=torch.bool).tril()  # causal inside the block
    if layout.every_row_queries:
        return mask
    block_rows = mask[f + layout.first_query :]
    return torch.cat([mask[:f], block_rows]) if layout.fam_queries else block_rows.clone()


_mask_by_device: dict[tuple[WindowLayout, torch.device], torch.Tensor] = {}


def window_mask(layout: WindowLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (queries, keys) mask, True where a query may attend; cached per layout and device."""
    device = torch.device(device)
    key = (layout, device)
    if key not in _mask_by_device:
        if len(_mask_by_device) > 128:
            _mask_by_device.clear()
        _mask_by_device[key] = _window_mask_cpu(layout).to(device)
    return _mask_by_device[key]


@dataclass
class AttentionStats:
    """Exact attention shares of one layer for one block (batch first)."""

    block_share: torch.Tensor  # (batch, heads, 4): block queries on BLOCK_GROUPS [fam, memory, block, sink]
    fam_share: torch.Tensor  # (batch, heads, 2): FAM queries on [fam, block], mean over slots
    fam_read: torch.Tensor  # (batch, block): FAM queries' probability per block token, mean over heads and slots
    slot_read: torch.Tensor  # (batch, fam, block): each FAM slot's probability per block token, mean over heads
    slot_received: torch.Tensor  # (batch, fam): block queries' probability on each FAM slot, mean over heads, queries
    token_share: torch.Tensor  # (batch, heads, block, 4): each block query's share on BLOCK_GROUPS (not averaged)


BACKENDS = ("sdpa", "flex", "flash")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Back ends usable on ``device``: sdpa always, flex where FlexAttention imports, flash on CUDA with flash-attn."""
    names = ["sdpa"]
    try:
        import torch.nn.attention.flex_attention

        names.append("flex")
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401

            names.append("flash")
        except ImportError:
            pass
    return names


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: WindowLayout,
    scale: float,
    with_stats: bool = False,
    backend: str = "sdpa",
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Masked attention of q (b, heads, Q, d) over k, v (b, kv_heads, K, d); GQA without repeating K/V.
    Q = ``layout.n_queries`` (the rows that ask), K = ``layout.n_keys``."""
    if with_stats:
        if not layout.every_row_queries:
            raise ValueError("attention statistics need every window row as a query")
        return attend_with_stats(q, k, v, layout, scale)
    if backend == "flex":
        return _attend_flex(q, k, v, layout, scale), None
    if backend == "flash":
        return attend_split(q, k, v, layout, scale, _flash_kernel), None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=window_mask(layout, q.device), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out, None


# -- split form (flash-attn) -----------------------------------------------------------------------
def attend_split(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, scale: float, kernel: Kernel
) -> torch.Tensor:
    """The window mask as two unmasked/causal kernel calls; ``kernel(q, k, v, scale, causal)``
    takes (b, heads, n, d) tensors, with causal meaning bottom-right aligned.

    q: (batch, heads, n_queries, head_dim); k, v: (batch, kv_heads, memory + fam + block, head_dim);
    returns (batch, heads, n_queries, head_dim). Block rows from ``first_query`` on are still the causal
    kernel's: bottom-right alignment puts the last query on the last key.
    """
    m, f = layout.memory, layout.fam_queried
    parts = []
    if f:
        parts.append(kernel(q[:, :, :f], k[:, :, m:], v[:, :, m:], scale, False))
    if layout.block > layout.first_query:
        parts.append(kernel(q[:, :, f:], k, v, scale, True))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Reference kernel for ``attend_split`` (bottom-right causal via an explicit mask).

    q: (batch, heads, n_q, head_dim); k, v: (batch, kv_heads, n_k, head_dim); returns (batch, heads, n_q, head_dim).
    """
    mask = None
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func  # (b, n, heads, d) layout, GQA native, causal bottom-right

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)


# -- FlexAttention ---------------------------------------------------------------------------------
_flex_masks: dict[tuple[WindowLayout, torch.device], object] = {}
_compiled_flex = None


def _attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, scale: float) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)  # uncompiled it materialises scores
    key = (layout, q.device)
    if key not in _flex_masks:
        m, f, asking = layout.memory, layout.fam, layout.fam_queried
        skipped = layout.first_query

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            fam_row = q_idx < asking
            sees_as_fam = kv_idx >= m
            token = q_idx - asking + skipped  # the query's index in the block
            sees_as_token = (kv_idx < m + f) | (kv_idx - m - f <= token)
            return (fam_row & sees_as_fam) | (~fam_row & sees_as_token)

        if len(_flex_masks) > 32:
            _flex_masks.clear()
        _flex_masks[key] = create_block_mask(mask_mod, None, None, layout.n_queries, layout.n_keys, device=q.device)
    return _compiled_flex(q, k, v, block_mask=_flex_masks[key], scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# -- statistics from per-group log-sum-exps -------------------------------------------------------
def attend_with_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, scale: float
) -> tuple[torch.Tensor, AttentionStats]:
    """Window attention plus exact shares, merged from one fused kernel call per key group.

    q: (batch, heads, fam + block, head_dim); k, v: (batch, kv_heads, memory + fam + block, head_dim);
    returns the output (batch, heads, fam + block, head_dim) and the stats (shapes on ``AttentionStats``).
    """
    m, f, n, s = layout.memory, layout.fam, layout.block, layout.sink
    b, heads = q.shape[:2]
    keys = {"sink": slice(0, s), "memory": slice(s, m), "fam": slice(m, m + f), "block": slice(m + f, m + f + n)}
    outputs = []
    slot_read = q.new_zeros(b, f, n, dtype=torch.float32)
    slot_received = q.new_zeros(b, f, dtype=torch.float32)
    fam_share = q.new_zeros(b, heads, 2, dtype=torch.float32)
    if f:  # FAM rows: [previous FAM, whole block], never memory
        groups = [g for g in FAM_GROUPS if keys[g].stop > keys[g].start]
        out, weights, lse = _merge_groups(q[:, :, :f], k, v, scale, [(keys[g], False) for g in groups])
        outputs.append(out)
        by_group = dict(zip(groups, weights, strict=True))
        fam_share = torch.stack([by_group.get(g, torch.zeros_like(lse)) for g in FAM_GROUPS], -1).mean(2)
        if n:
            slot_read = _token_probs(q[:, :, :f], k[:, :, keys["block"]], lse, scale).mean(dim=1)
    token_share = q.new_zeros(b, heads, n, len(BLOCK_GROUPS), dtype=torch.float32)
    if n:  # block tokens: all sinks and memory, all FAM, their block causally
        groups = [g for g in BLOCK_GROUPS if keys[g].stop > keys[g].start]
        out, weights, lse = _merge_groups(q[:, :, f:], k, v, scale, [(keys[g], g == "block") for g in groups])
        outputs.append(out)
        by_group = dict(zip(groups, weights, strict=True))
        token_share = torch.stack([by_group.get(g, torch.zeros_like(lse)) for g in BLOCK_GROUPS], -1)
        if f:
            slot_received = _token_probs(q[:, :, f:], k[:, :, keys["fam"]], lse, scale).mean(dim=(1, 2))
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    stats = AttentionStats(
        block_share=token_share.mean(2) if n else q.new_zeros(b, heads, len(BLOCK_GROUPS), dtype=torch.float32),
        fam_share=fam_share,
        fam_read=slot_read.mean(dim=1) if f else q.new_zeros(b, n, dtype=torch.float32),
        slot_read=slot_read,
        slot_received=slot_received,
        token_share=token_share,
    )
    return out, stats


def _merge_groups(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, groups: list[tuple[slice, bool]]
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Attention of q over the union of key ranges ``groups`` [(slice, causal)], plus each group's
    softmax mass (b, heads, queries) and the union's log-sum-exp."""
    parts = [_attention_with_lse(q, k[:, :, keys], v[:, :, keys], scale, causal) for keys, causal in groups]
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total)
    if len(parts) == 1:
        return parts[0][0], list(weights), total
    out = weights[0].unsqueeze(-1) * parts[0][0]  # float32 (weights are float32)
    for w, (o, _) in zip(weights[1:], parts[1:], strict=True):
        out += w.unsqueeze(-1) * o
    return out.to(q.dtype), list(weights), total


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (b, heads, Q, d), log-sum-exp (b, heads, Q) float32); causal is top-left (Q == K here)."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    return _attention_with_lse_reference(q, k, v, scale, causal)


def _attention_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit form (any device): scores in float32, GQA by grouping query heads."""
    b, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(b, kv_heads, group * n_q, d), k.transpose(-1, -2)).float() * scale
    scores = scores.view(b, kv_heads, group, n_q, n_k)
    if causal:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs.to(v.dtype).view(b, kv_heads, group * n_q, n_k), v).view(b, heads, n_q, d)
    return out, lse.view(b, heads, n_q)


def _token_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax probabilities (b, heads, Q, K) of q on the keys k, given the rows' full log-sum-exp."""
    b, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(b, kv_heads, group * n_q, d), k.transpose(-1, -2)).float() * scale
    return torch.exp(scores.view(b, heads, n_q, n_k) - lse.unsqueeze(-1))


def attend_reference_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, scale: float
) -> tuple[torch.Tensor, AttentionStats]:
    """The explicit-softmax form of ``attend_with_stats`` (materialises the probabilities; for tests).

    q: (batch, heads, fam + block, head_dim); k, v: (batch, kv_heads, memory + fam + block, head_dim);
    returns the output (batch, heads, fam + block, head_dim) and the stats.
    """
    return _attend_with_probs(q, k, v, layout, window_mask(layout, q.device), scale)


def _attend_with_probs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, AttentionStats]:
    b, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads  # query head h uses kv head h // group (as repeat_kv does)
    scores = torch.matmul(q.reshape(b, kv_heads, group * n_q, d), k.transpose(-1, -2))
    scores = scores.view(b, kv_heads, group, n_q, n_k).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype).view(b, kv_heads, group * n_q, n_k), v)
    out = out.view(b, heads, n_q, d)
    probs = probs.view(b, heads, n_q, n_k)
    return out, _shares(probs, layout)


def _shares(probs: torch.Tensor, layout: WindowLayout) -> AttentionStats:
    m, f, n, s = layout.memory, layout.fam, layout.block, layout.sink
    b, heads = probs.shape[:2]
    block_rows = probs[:, :, f:]
    if n:
        columns = {"fam": slice(m, m + f), "memory": slice(s, m), "block": slice(m + f, None), "sink": slice(0, s)}
        token_share = torch.stack([block_rows[..., columns[g]].sum(-1) for g in BLOCK_GROUPS], dim=-1)
        block_share = token_share.mean(dim=2)
    else:
        token_share = probs.new_zeros(b, heads, 0, len(BLOCK_GROUPS))
        block_share = probs.new_zeros(b, heads, len(BLOCK_GROUPS))
    if f:
        fam_rows = probs[:, :, :f]
        fam_share = torch.stack([fam_rows[..., m : m + f].sum(-1), fam_rows[..., m + f :].sum(-1)], dim=-1).mean(dim=2)
        slot_read = fam_rows[..., m + f :].mean(dim=1)
        slot_received = block_rows[..., m : m + f].mean(dim=(1, 2)) if n else probs.new_zeros(b, f)
    else:
        fam_share = probs.new_zeros(b, heads, 2)
        slot_read = probs.new_zeros(b, 0, n)
        slot_received = probs.new_zeros(b, 0)
    return AttentionStats(
        block_share=block_share,
        fam_share=fam_share,
        fam_read=slot_read.mean(dim=1) if f else probs.new_zeros(b, n),
        slot_read=slot_read,
        slot_received=slot_received,
        token_share=token_share,
    )

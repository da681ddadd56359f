"""Attention over one block's window: [memory blocks | FAM | current block].

Queries are the block's rows in the order [FAM rows | block tokens]. The mask (FAM_SPEC §2):

    query \\ key     memory     FAM     block
    FAM rows         masked     all     all (whole block)
    block token i    all        all     causal (j <= i)

Two paths compute the same output: ``sdpa`` (PyTorch's fused kernel, no statistics) and
``probs`` (explicit softmax, used when a trace is recorded: the probabilities give exact shares).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WindowLayout:
    """Sizes of the key groups and query groups of one block's attention."""

    memory: int  # cached token keys from earlier blocks
    fam: int  # FAM rows (queries and keys)
    block: int  # tokens of the current block (queries and keys)

    @property
    def n_queries(self) -> int:
        return self.fam + self.block

    @property
    def n_keys(self) -> int:
        return self.memory + self.fam + self.block


@lru_cache(maxsize=64)
def _window_mask_cpu(layout: WindowLayout) -> torch.Tensor:
    m, f, n = layout.memory, layout.fam, layout.block
    mask = torch.zeros(f + n, m + f + n, dtype=torch.bool)
    mask[:f, m:] = True  # FAM rows: previous FAM and the whole block, never memory
    mask[f:, : m + f] = True  # block tokens: all memory and the FAM
    mask[f:, m + f :] = torch.ones(n, n, dtype=torch.bool).tril()  # causal inside the block
    return mask


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

    block_share: torch.Tensor  # (batch, heads, 3): block queries on [fam, memory, block], mean over queries
    fam_share: torch.Tensor  # (batch, heads, 2): FAM queries on [fam, block], mean over slots
    fam_read: torch.Tensor  # (batch, block): FAM queries' probability per block token, mean over heads and slots


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, scale: float,
           with_stats: bool = False) -> tuple[torch.Tensor, AttentionStats | None]:
    """Masked attention of q (b, heads, Q, d) over k, v (b, kv_heads, K, d); GQA without repeating K/V."""
    mask = window_mask(layout, q.device)
    if not with_stats:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out, None
    return _attend_with_probs(q, k, v, layout, mask, scale)


def _attend_with_probs(q, k, v, layout: WindowLayout, mask, scale):
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
    m, f, n = layout.memory, layout.fam, layout.block
    b, heads = probs.shape[:2]
    block_rows = probs[:, :, f:]
    if n:
        block_share = torch.stack([
            block_rows[..., m : m + f].sum(-1),
            block_rows[..., :m].sum(-1),
            block_rows[..., m + f :].sum(-1),
        ], dim=-1).mean(dim=2)
    else:
        block_share = probs.new_zeros(b, heads, 3)
    if f:
        fam_rows = probs[:, :, :f]
        fam_share = torch.stack([fam_rows[..., m : m + f].sum(-1), fam_rows[..., m + f :].sum(-1)], dim=-1).mean(dim=2)
        fam_read = fam_rows[..., m + f :].mean(dim=(1, 2))
    else:
        fam_share = probs.new_zeros(b, heads, 2)
        fam_read = probs.new_zeros(b, n)
    return AttentionStats(block_share=block_share, fam_share=fam_share, fam_read=fam_read)

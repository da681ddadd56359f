"""Continuing a stream token by token: exact incremental decoding inside the current block.

A block's token rows see every memory key, every FAM key and the earlier tokens of their own block
(docs/algorithm.md §2), and the FAM keys of a layer depend only on the state's FAM for that layer, not on the
block. So once the window's keys and values are cached, new tokens need only their own rows: the
logits equal ``forward_block`` on the whole block. When a block fills up, it is run once as a
block to get the next state (its FAM update needs the whole block), and decoding goes on in the next.

Cursors never modify tensors in place, so ``fork`` is free: a probe can fork the stream's state,
ask its question and answer, and leave the stream exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from famviz.core.fam_model import FamModel, StreamState, apply_rope


def end_of_sequence_ids(fam_model: FamModel) -> set:
    """The token ids that end a generated answer (the model config's eos, one id or several)."""
    eos = fam_model.model.config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def fam_keys_values(fam_model: FamModel, state: StreamState, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's FAM keys (rotated to the slots' positions) and values as the next block reads them.

    Each (batch, kv_heads, fam_len, head_dim).
    """
    fam_cos, fam_sin, _, _ = fam_model.window_angles(state.position, state.memory_tokens, fam_model.fam_len, 0)
    _, keys, values = fam_model.qkv(layer, state.fam[layer])
    return apply_rope(keys, fam_cos, fam_sin), values


@dataclass(frozen=True)
class _OpenBlock:
    state: StreamState  # the state at the block's start
    tokens: tuple[int, ...]  # tokens of the block so far
    window_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: keys (rotated), values
    origin: int  # absolute position that RoPE maps to 0 in this window


class BlockCursor:
    """Feeds tokens one or a few at a time from a ``StreamState`` at a block boundary.

    ``extend(ids)`` returns float32 logits (len(ids), vocab): row i predicts the token after ids[i].

    ``fam_kv_edit(layer, keys, values)``: optional; given one layer's FAM keys (rotated) and values
    (batch, kv_heads, fam_len, head_dim) as the first block reads them, returns the ones to read instead
    (an intervention on the reading of the memory, ``famviz.probes.ablation``; later blocks are not edited).
    """

    def __init__(
        self,
        fam_model: FamModel,
        state: StreamState,
        fam_kv_edit: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.fam_model = fam_model
        self._open = self._open_block(state, fam_kv_edit)

    @property
    def position(self) -> int:
        return self._open.state.position + len(self._open.tokens)

    def fork(self) -> BlockCursor:
        twin = object.__new__(BlockCursor)
        twin.fam_model, twin._open = self.fam_model, self._open
        return twin

    def rewound(self, count: int) -> BlockCursor | None:
        """A fork without the last ``count`` tokens, or None when they are not all in the open block."""
        block = self._open
        if count > len(block.tokens):
            return None
        keep = block.window_kv[0][0].shape[2] - count
        twin = self.fork()
        twin._open = replace(
            block,
            tokens=block.tokens[: len(block.tokens) - count],
            window_kv=tuple((k[:, :, :keep], v[:, :, :keep]) for k, v in block.window_kv),
        )
        return twin

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feed ``token_ids`` (n tokens); returns float32 logits (n, vocab), row i predicting the token after ids[i]."""
        ids = [int(t) for t in token_ids]
        block_size = self.fam_model.config.block_size
        pieces = []
        while ids:
            if len(self._open.tokens) == block_size:
                self._open = self._open_block(self._close_block())
            room = block_size - len(self._open.tokens)
            chunk, ids = ids[:room], ids[room:]
            pieces.append(self._step(chunk))
        return torch.cat(pieces) if pieces else torch.zeros(0, self.fam_model.model.config.vocab_size)

    @torch.inference_mode()
    def greedy(
        self, first_logits: torch.Tensor, max_new_tokens: int, stop: Callable[[list[int]], bool] | None = None
    ) -> list[int]:
        """Greedy continuation from the logits (vocab,) of the last fed token; ``stop(ids)`` ends it early."""
        eos = end_of_sequence_ids(self.fam_model)
        logits, out = first_logits, []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            if token in eos:
                break
            out.append(token)
            if len(out) == max_new_tokens or (stop is not None and stop(out)):
                break
            logits = self.extend([token])[-1]
        return out

    # -- internals ---------------------------------------------------------------------------
    def _open_block(
        self,
        state: StreamState,
        fam_kv_edit: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> _OpenBlock:
        """Cache each layer's window keys/values before any token of the block: memory and FAM."""
        fm = self.fam_model
        f, m = fm.fam_len, state.memory_tokens
        _, _, mem_cos, mem_sin = fm.window_angles(state.position, m, f, 0)
        bounded = fm.memory_capacity is not None
        window_kv = []
        for index in range(len(fm.layers)):
            keys, values = state.mem_k[index], state.mem_v[index]
            if m and bounded:
                keys = apply_rope(keys, mem_cos, mem_sin)  # bounded memory holds pre-RoPE keys
            if f:
                fam_k, fam_v = fam_keys_values(fm, state, index)
                if fam_kv_edit is not None:
                    fam_k, fam_v = fam_kv_edit(index, fam_k, fam_v)
                keys = torch.cat([keys, fam_k], dim=2)
                values = torch.cat([values, fam_v], dim=2)
            window_kv.append((keys, values))
        origin = state.position - max(m, f) if bounded else 0  # as in FamModel.window_positions
        return _OpenBlock(state=state, tokens=(), window_kv=tuple(window_kv), origin=origin)

    def _close_block(self) -> StreamState:
        """Run the full block once: the next block needs its FAM update and memory."""
        fm, block = self.fam_model, self._open
        ids = torch.tensor([block.tokens], dtype=torch.long)
        out = fm.forward_block(ids, block.state)
        _, last_logits = fm.next_token_nll(out.hidden, ids, block.state.last_logits)
        return replace(out.state, last_logits=last_logits)

    def _step(self, chunk: list[int]) -> torch.Tensor:
        fm, block = self.fam_model, self._open
        start = block.state.position + len(block.tokens)
        cos, sin = fm._rope(torch.arange(start, start + len(chunk), device=fm.device) - block.origin)
        x = fm.decoder.embed_tokens(torch.tensor([chunk], dtype=torch.long, device=fm.device))
        n_cached = block.window_kv[0][0].shape[2]
        # New rows see the whole cached window and, causally, each other.
        mask = torch.ones(len(chunk), n_cached + len(chunk), dtype=torch.bool, device=fm.device)
        mask[:, n_cached:] = mask[:, n_cached:].tril()
        window_kv = []
        for index in range(len(fm.layers)):
            q, k, v = fm.qkv(index, x)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys = torch.cat([block.window_kv[index][0], k], dim=2)
            values = torch.cat([block.window_kv[index][1], v], dim=2)
            window_kv.append((keys, values))
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=fm.scale, enable_gqa=q.shape[1] != keys.shape[1]
            )
            x = fm.layer_tail(index, x, out)
        self._open = replace(block, tokens=block.tokens + tuple(chunk), window_kv=tuple(window_kv))
        return fm.logits(fm.decoder.norm(x))[0].float()

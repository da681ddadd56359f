"""TransformerFAM on top of a pretrained decoder, with no new weights (docs/algorithm.md §1-§4).

``FamModel.forward_block`` is the whole algorithm for one block, readable top to bottom:
for every layer, the layer's FAM rows are prepended to the block's hidden states, both go through
the layer's own norms, projections, attention and MLP, the block rows continue up the stack and the
FAM rows become that layer's FAM for the next block. ``full`` and ``bswa`` are the same code with
no FAM rows and an unbounded / bounded key-value memory; ``sink`` is ``bswa`` whose memory also keeps
the stream's first tokens for ever (StreamingLLM), at the positions just before the recent blocks
(positions within the cache, as StreamingLLM assigns them).

Positions: a block only ever sees keys within its window, and RoPE depends only on relative
distances, so positions are rebased to the window's start (exact in real arithmetic). In bounded
modes the memory therefore keeps keys *before* RoPE and rotates them per block with the window's
(cached) angles; ``full`` keeps rotated keys at absolute positions, like the model's own cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
import torch.utils.checkpoint

from famviz.core.attention import BACKENDS, AttentionStats, WindowLayout, attend
from famviz.core.config import FamConfig
from famviz.core.linear_nll import linear_nll
from famviz.core.model import LoadedModel
from famviz.core.projections import ProjectionGroup

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


@dataclass(frozen=True)
class StreamState:
    """Everything a stream carries from one block to the next.

    In ``bswa``/``fam`` modes its size is constant: per layer, at most mem_blocks·block_size token
    keys/values plus fam_len FAM vectors. States are never modified in place, so a state can be
    kept and resumed from any number of times (forking costs nothing).
    """

    position: int  # tokens consumed so far
    fam: tuple[torch.Tensor, ...]  # per layer (batch, fam_len, d); empty tuple without FAM
    fam_fresh: bool  # the FAM is still the context-free initial one (its first update drops the residual)
    mem_k: tuple[torch.Tensor, ...]  # per layer (batch, kv_heads, M, head_dim)
    mem_v: tuple[torch.Tensor, ...]
    last_logits: torch.Tensor | None  # (batch, vocab) float32: prediction of the next token

    def nbytes(self) -> int:
        tensors = [*self.fam, *self.mem_k, *self.mem_v]
        if self.last_logits is not None:
            tensors.append(self.last_logits)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def memory_tokens(self) -> int:
        return self.mem_k[0].shape[2] if self.mem_k else 0


def state_memory(state: StreamState, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s memory keys and values in ``state``."""
    return state.mem_k[index], state.mem_v[index]


@dataclass
class BlockOutput:
    hidden: torch.Tensor  # (batch, n, d) after the final norm
    state: StreamState
    stats: list[AttentionStats] | None  # per layer, when requested
    fam_before: tuple[torch.Tensor, ...]  # the FAM this block read (for update-size statistics)


class WindowAngles(NamedTuple):
    """RoPE cos/sin of one window, each (1 or batch, 1, P, head_dim): the query/key rows [FAM ; block], and the
    memory keys (None in full attention, whose memory keys are stored rotated)."""

    rows_cos: torch.Tensor
    rows_sin: torch.Tensor
    memory_cos: torch.Tensor | None
    memory_sin: torch.Tensor | None


class LayerStep(NamedTuple):
    """What one layer's pass over [FAM ; block] hands on."""

    hidden: torch.Tensor  # (batch, n, d): the block rows, input of the next layer
    fam: torch.Tensor | None  # (batch, fam_len, d): this layer's FAM for the next block (None without FAM)
    stored_k: torch.Tensor  # (batch, kv_heads, n, head_dim): the block's keys to remember (pre-RoPE when bounded)
    stored_v: torch.Tensor
    stats: AttentionStats | None
    keys: torch.Tensor  # (batch, kv_heads, window, head_dim): the whole window's keys (rotated) and values
    values: torch.Tensor


class LayerWindow(NamedTuple):
    """What every layer of one pass over a window shares: which rows ask (``layout``), the RoPE angles of the
    rows computed ([FAM ; block tokens from layout.first_query on]) and of the memory keys, and whether the FAM
    rows' residual starts at zero (the first update of the context-free initial FAM, docs/algorithm.md §3)."""

    layout: WindowLayout
    angles: WindowAngles
    fam_fresh: bool = False
    with_stats: bool = False


class FamModel:
    """A pretrained causal LM run as TransformerFAM / BSWA / full attention over blocks."""

    def __init__(
        self, loaded: LoadedModel, config: FamConfig, fam_prompt: torch.Tensor | None = None, backend: str = "sdpa"
    ):
        if backend not in BACKENDS:
            raise ValueError(f"attention back end must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.loaded = loaded
        self.config = config
        self.model = loaded.model
        self.decoder = loaded.model.model
        self.layers = list(self.decoder.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.n_heads = loaded.config.num_attention_heads
        self.n_kv_heads = loaded.config.num_key_value_heads
        self.hidden_size = loaded.config.hidden_size
        self.fam_len = config.active_fam_len
        self.memory_capacity = config.mem_blocks * config.block_size if config.bounded else None
        self.sink_tokens = config.active_sink_tokens  # kept in memory before the recent blocks' tokens
        if self.fam_len:
            if fam_prompt is None:
                from famviz.core.fam_prompt import default_fam_prompt

                fam_prompt = default_fam_prompt(loaded, self.fam_len)
            if tuple(fam_prompt.shape) != (self.fam_len, self.hidden_size):
                raise ValueError(
                    f"FAM prompt has shape {tuple(fam_prompt.shape)}, expected ({self.fam_len}, {self.hidden_size})"
                )
        # The one place that decides where a learned FAM prompt applies: callers pass an adapter's prompt
        # whatever the mode, and a mode without a FAM ignores it.
        self.fam_prompt = fam_prompt if self.fam_len else None
        self._initial_fam: tuple[torch.Tensor, ...] | None = None
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.checkpoint_layers = False  # recompute layers in backward (set by training)
        # q/k/v and gate/up as one matrix multiply each (famviz.core.projections); training turns it on. It
        # keeps a concatenated copy of those frozen weights, so inference, where it would double them, does not.
        self.fused_projections = False
        self._groups: dict[tuple[int, str], ProjectionGroup] = {}

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @property
    def blocks_independent(self) -> bool:
        """BSWA without memory blocks: no block sees anything of an earlier one."""
        return self.fam_len == 0 and self.memory_capacity == 0 and self.sink_tokens == 0

    # -- state -------------------------------------------------------------------------------
    def initial_state(
        self, batch: int = 1, fam: tuple[torch.Tensor, ...] | None = None, fam_fresh: bool = True
    ) -> StreamState:
        """The state before a document's first token: no memory, and ``fam`` (per layer (1 or batch,
        fam_len, d); default the initial FAM) expanded to ``batch``. ``fam_fresh``: the FAM is context-free
        (its first update drops the residual); False for a FAM carried over from another stream (RSP)."""
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=self.device, dtype=self.dtype)
        if not self.fam_len:
            fam = ()
        elif fam is None:
            fam = self.initial_fam()
        fam = tuple(f.expand(batch, -1, -1) for f in fam)
        return StreamState(
            position=0,
            fam=fam,
            fam_fresh=fam_fresh or not self.fam_len,
            mem_k=(empty,) * len(self.layers),
            mem_v=(empty,) * len(self.layers),
            last_logits=None,
        )

    def initial_fam(self) -> tuple[torch.Tensor, ...]:
        """Per layer (1, fam_len, d): the FAM prompt run alone up the stack (docs/algorithm.md §3).

        F^l_0 = P^l with P^0 = prompt and P^{l+1} = layer_l(P^l), FAM rows attending bidirectionally
        to each other only. Context-free, so computed once.
        """
        if self._initial_fam is None:
            self._initial_fam = self.run_prompt_up_the_stack(self.fam_prompt)
        return self._initial_fam

    def run_prompt_up_the_stack(self, prompt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Differentiable form of ``initial_fam`` (training learns the prompt through it).

        prompt: (fam_len, d); returns per layer (1, fam_len, d).
        """
        f = prompt.shape[0]
        # Positions 0 … f-1 and never a random offset (RPO): the initial FAM is the same in every stream.
        angles = WindowAngles(*self._rope(torch.arange(f, device=self.device)), None, None)
        window = LayerWindow(WindowLayout(memory=0, fam=f, block=0), angles)
        h = prompt.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        no_tokens = h[:, :0]
        no_memory = (h.new_zeros(1, self.n_kv_heads, 0, self.head_dim),) * 2
        per_layer = []
        for index in range(len(self.layers)):
            per_layer.append(h)
            h = self._layer(index, no_tokens, h, no_memory, None, window).fam
        return tuple(per_layer)

    def invalidate_initial_fam(self) -> None:
        self._initial_fam = None

    # -- one block ---------------------------------------------------------------------------
    def forward_block(
        self, input_ids: torch.Tensor, state: StreamState, with_stats: bool = False, window_kv: list | None = None
    ) -> BlockOutput:
        """Run one block of tokens (batch, n) from ``state``; returns hidden states and the next state.

        ``window_kv``: when a list is given, each layer's attention keys (rotated) and values over the
        whole window [memory | FAM | block] are appended to it, so a decoder can continue the block
        token by token (``famviz.core.decode``).
        """
        batch, n = input_ids.shape
        f, m = self.fam_len, state.memory_tokens
        layout = WindowLayout(memory=m, fam=f, block=n, sink=min(self.sink_tokens, m))
        window = LayerWindow(layout, self.window_angles(state.position, m, f, n), state.fam_fresh, with_stats)
        x = self.decoder.embed_tokens(input_ids.to(self.device))
        new_fam, new_k, new_v, stats = [], [], [], []
        for index in range(len(self.layers)):
            fam = state.fam[index] if f else None
            outputs = self._run_layer(self._layer, index, x, fam, state_memory(state, index), None, window)
            x = outputs.hidden
            if f:
                new_fam.append(outputs.fam)
            new_k.append(self._remember(state.mem_k[index], outputs.stored_k))
            new_v.append(self._remember(state.mem_v[index], outputs.stored_v))
            if with_stats:
                stats.append(outputs.stats)
            if window_kv is not None:
                window_kv.append((outputs.keys, outputs.values))
        hidden = self.decoder.norm(x)
        next_state = replace(
            state,
            position=state.position + n,
            fam=self.settle_fam(state, new_fam),
            fam_fresh=state.fam_fresh and not f,
            mem_k=tuple(new_k),
            mem_v=tuple(new_v),
        )
        return BlockOutput(hidden=hidden, state=next_state, stats=stats if with_stats else None, fam_before=state.fam)

    @property
    def can_finish_blocks(self) -> bool:
        """``finish_block`` applies: a FAM and nothing else carried between blocks (no memory, no sinks)."""
        return bool(self.fam_len) and self.memory_capacity == 0 and not self.sink_tokens

    def finish_block(self, input_ids: torch.Tensor, state: StreamState, window_kv: list, prefix: int) -> BlockOutput:
        """The block [the first ``prefix`` tokens of a block already run ; ``input_ids``] from ``state``,
        without computing those tokens' rows again: ``window_kv`` is what ``forward_block`` collected for
        that block, run from the same ``state``.

        A token row sees only the FAM and the rows before it in its block, so the prefix rows are the same
        in both blocks; only the FAM rows (they read the whole block) and the new rows are computed, which
        costs (fam_len + s) rows instead of (fam_len + prefix + s). Returns the new rows' hidden states
        (batch, s, d) and the state after the whole block, equal to ``forward_block`` on the whole block
        (tested). Training asks a question at the end of a block of the stream's own text this way.
        Needs ``can_finish_blocks`` (the memory after the block would need the prefix's pre-RoPE keys).
        """
        if not self.can_finish_blocks:
            raise ValueError("finish_block needs a FAM and no memory blocks or sink tokens")
        s = input_ids.shape[1]
        f, n = self.fam_len, prefix + s
        rows_cos, rows_sin, _, _ = self.window_angles(state.position, 0, f, n)
        rows = torch.cat([torch.arange(f), torch.arange(f + prefix, f + n)]).to(self.device)  # FAM and new rows
        angles = WindowAngles(rows_cos.index_select(2, rows), rows_sin.index_select(2, rows), None, None)
        window = LayerWindow(WindowLayout(memory=0, fam=f, block=n, first_query=prefix), angles, state.fam_fresh)
        x = self.decoder.embed_tokens(input_ids.to(self.device))
        new_fam = []
        for index in range(len(self.layers)):
            keys, values = window_kv[index]  # window: [FAM | block]
            earlier = (keys[:, :, f : f + prefix], values[:, :, f : f + prefix])
            outputs = self._run_layer(
                self._layer, index, x, state.fam[index], state_memory(state, index), earlier, window
            )
            new_fam.append(outputs.fam)
            x = outputs.hidden
        next_state = replace(state, position=state.position + n, fam=self.settle_fam(state, new_fam), fam_fresh=False)
        return BlockOutput(hidden=self.decoder.norm(x), state=next_state, stats=None, fam_before=state.fam)

    def settle_fam(self, state: StreamState, updated: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The FAM a block hands on: the layers' outputs for the FAM rows, or with ``fam_norm`` keep each
        slot rescaled to the norm it had before this update (not on the first update, whose input is the
        context-free prompt: that write sets the norm). Per slot because every reader normalises each
        slot on its own (RMSNorm), so the norm only sets how much of the state the next update replaces."""
        if self.config.fam_norm == "grow" or state.fam_fresh or not updated:
            return tuple(updated)
        kept = []
        for before, after in zip(state.fam, updated, strict=True):
            old_norm = before.float().norm(dim=-1, keepdim=True)
            new_norm = after.float().norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            kept.append(after * (old_norm / new_norm).to(after.dtype))
        return tuple(kept)

    def read_block(self, input_ids: torch.Tensor, state: StreamState, offset: int = 0) -> torch.Tensor:
        """Hidden states (batch, n, d), after the final norm, of a side block that reads ``state`` but
        changes nothing: with ``offset`` 0 the same as ``forward_block(input_ids, state).hidden`` (block
        rows never see the FAM rows' outputs of their own block), without computing the FAM update.

        ``offset``: the rows sit at positions offset … offset+n-1 of the block (RoPE), as if ``offset``
        tokens came first, unseen. Training asks a question this way after every block (a read-out probe
        of the current FAM), at varied offsets, since a real question can come anywhere in its block.
        """
        batch, n = input_ids.shape
        f, m = self.fam_len, state.memory_tokens
        layout = WindowLayout(memory=m, fam=f, block=n)
        rows_cos, rows_sin, mem_cos, mem_sin = self.window_angles(state.position, m, f, offset + n)
        if offset:  # the FAM rows' angles, then those of the block rows from ``offset`` on
            rows_cos = torch.cat([rows_cos[:, :, :f], rows_cos[:, :, f + offset :]], dim=2)
            rows_sin = torch.cat([rows_sin[:, :, :f], rows_sin[:, :, f + offset :]], dim=2)
        window = LayerWindow(replace(layout, fam_queries=False), WindowAngles(rows_cos, rows_sin, mem_cos, mem_sin))
        x = self.decoder.embed_tokens(input_ids.to(self.device))
        for index in range(len(self.layers)):
            fam = state.fam[index] if f else None
            x = self._run_layer(self._layer, index, x, fam, state_memory(state, index), None, window).hidden
        return self.decoder.norm(x)

    def _run_layer(self, step: Callable[..., T], *args: object) -> T:
        """``step(*args)``, one layer's work; in training with ``checkpoint_layers`` recomputed in backward
        instead of keeping its activations (training backpropagates through every block)."""
        if self.checkpoint_layers and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        return step(*args)

    def _layer(
        self,
        index: int,
        x: torch.Tensor,
        fam: torch.Tensor | None,
        memory: tuple[torch.Tensor, torch.Tensor],
        earlier: tuple[torch.Tensor, torch.Tensor] | None,
        window: LayerWindow,
    ) -> LayerStep:
        """One layer over the window [memory | FAM | block]: the per-layer step of every pass (a block, a side
        read of the FAM, the end of a block already begun, the prompt's run up the stack).

        x: (batch, rows, d) the block tokens computed here (from ``layout.first_query`` on), from the layer
        below; fam: (batch, fam_len, d) this layer's FAM rows (None without FAM); memory: this layer's memory
        keys (pre-RoPE when bounded) and values (batch, kv_heads, m, head_dim); earlier: the rotated keys and
        values of the block's first ``first_query`` tokens (None when there are none). Returns the asking rows'
        outputs: the FAM rows' as ``fam`` (when they ask), the block tokens' as ``hidden``.
        """
        layout, (rows_cos, rows_sin, mem_cos, mem_sin) = window.layout, window.angles
        f, asking = layout.fam, layout.fam_queried
        z = torch.cat([fam, x], dim=1) if f else x  # FAM rows are prepended: [F ; X]
        q, k, v = self.qkv(index, z)
        asks = slice(f - asking, None)  # the FAM rows ask only when they are updated
        q_rot = apply_rope(q[:, :, asks], rows_cos[:, :, asks], rows_sin[:, :, asks])
        k_rot = apply_rope(k, rows_cos, rows_sin)
        mem_k, mem_v = memory
        if mem_k.shape[2] and self.memory_capacity is not None:
            mem_k = apply_rope(mem_k, mem_cos, mem_sin)  # bounded memory holds pre-RoPE keys
        if earlier is None:
            keys, values = torch.cat([mem_k, k_rot], dim=2), torch.cat([mem_v, v], dim=2)
        else:  # [memory | FAM | the block's earlier tokens | these tokens]
            keys = torch.cat([mem_k, k_rot[:, :, :f], earlier[0], k_rot[:, :, f:]], dim=2)
            values = torch.cat([mem_v, v[:, :, :f], earlier[1], v[:, :, f:]], dim=2)
        out, layer_stats = attend(q_rot, keys, values, layout, self.scale, window.with_stats, self.backend)
        residual = z if asking else x
        if asking and window.fam_fresh:  # the first update of the context-free initial FAM: a zero residual
            residual = torch.cat([torch.zeros_like(fam), x], dim=1)
        h = self.layer_tail(index, residual, out)  # FAM rows go through the MLP too
        return LayerStep(
            hidden=h[:, asking:],
            fam=h[:, :asking] if asking else None,
            stored_k=k[:, :, f:] if self.memory_capacity is not None else k_rot[:, :, f:],
            stored_v=v[:, :, f:],
            stats=layer_stats,
            keys=keys,
            values=values,
        )

    def _remember(self, memory: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The memory after a block: the last mem_blocks blocks' tokens, after the sink tokens if any.

        Sink mode's memory always starts with the stream's first min(sink_tokens, position) tokens, so
        the first ``sink_tokens`` of memory + block are the stream's first tokens."""
        capacity, sinks = self.memory_capacity, self.sink_tokens
        if capacity == 0 and not sinks:
            return memory
        if capacity is not None and not sinks and new.shape[2] >= capacity:
            return new[:, :, -capacity:]  # the new block alone fills the memory: no copy
        joined = torch.cat([memory, new], dim=2)
        kept = min(sinks, joined.shape[2])
        if capacity is not None and joined.shape[2] > kept + capacity:
            recent = joined[:, :, joined.shape[2] - capacity :]  # the last mem_blocks blocks
            joined = torch.cat([joined[:, :, :kept], recent], dim=2) if kept else recent
        return joined

    def _group(self, index: int, name: str, modules: tuple[torch.nn.Module, ...]) -> ProjectionGroup:
        key = (index, name)
        if key not in self._groups:
            self._groups[key] = ProjectionGroup(list(modules))
        return self._groups[key]

    def qkv(self, index: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values (batch, heads, rows, head_dim) of rows z (batch, rows, d), before RoPE."""
        layer = self.layers[index]
        attn = layer.self_attn
        h = layer.input_layernorm(z)
        shape = (z.shape[0], z.shape[1], -1, self.head_dim)
        if self.fused_projections:
            q, k, v = self._group(index, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj))(h)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if self.loaded.arch.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """The layer's gated MLP, down(act(gate(h)) * up(h)), with gate/up fused when enabled.

        h: (batch, rows, d); returns (batch, rows, d).
        """
        mlp = self.layers[index].mlp
        if not self.fused_projections:
            return mlp(h)
        gate, up = self._group(index, "gate_up", (mlp.gate_proj, mlp.up_proj))(h)
        (down,) = self._group(index, "down", (mlp.down_proj,))(mlp.act_fn(gate) * up)
        return down

    def layer_tail(self, index: int, residual: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The rest of a pre-norm layer after attention: a = residual + o_proj(attention), then a + mlp(norm(a)).

        residual: (batch, rows, d); attention: (batch, heads, rows, head_dim); returns (batch, rows, d).
        """
        layer = self.layers[index]
        b, heads, n, d = attention.shape
        merged_heads = attention.transpose(1, 2).reshape(b, n, heads * d)
        if self.fused_projections:
            (attended,) = self._group(index, "o", (layer.self_attn.o_proj,))(merged_heads)
        else:
            attended = layer.self_attn.o_proj(merged_heads)
        a = residual + attended
        return a + self.mlp(index, layer.post_attention_layernorm(a))

    # -- positions ---------------------------------------------------------------------------
    def window_positions(self, position: int, m: int, f: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions of one window's rows [FAM ; block] (f + n,) and memory keys (m,) (None in full attention).

        Absolute positions: memory = position-m … position-1, FAM = the last f positions of the
        previous block (position-f … position-1; -f … -1 for the first block), block = position … .
        Bounded modes rebase them to the window's start so they stay small on unbounded streams.
        """
        if self.memory_capacity is None:  # full attention: absolute positions, like the model itself
            return torch.arange(position - f, position + n), None
        start = position - max(m, f)
        rows = torch.cat([torch.arange(position - f, position), torch.arange(position, position + n)]) - start
        return rows, torch.arange(position - m, position) - start

    def window_angles(self, position: int, m: int, f: int, n: int) -> WindowAngles:
        """RoPE angles of ``window_positions`` (rebased windows depend only on (m, f, n): cached)."""
        key = (m, f, n)
        if self.memory_capacity is not None and key in self._rope_cache:
            return self._rope_cache[key]
        rows, memory = self.window_positions(position, m, f, n)
        angles = WindowAngles(
            *self._rope(rows.to(self.device)),
            *(self._rope(memory.to(self.device)) if memory is not None else (None, None)),
        )
        if self.memory_capacity is not None:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = angles
        return angles

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.decoder.rotary_emb(probe, positions.unsqueeze(0))  # angles computed in fp32
        return cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, P, head_dim): broadcast over batch and heads

    # -- outputs -----------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (batch, n, vocab) of final-norm hidden states (batch, n, d)."""
        return self.model.lm_head(hidden)

    def lens(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The logit lens of residual-stream rows (..., d) that are not final-norm hidden states (a layer's
        FAM slots): decoded through the final norm and the unembedding as if they were the last layer's
        output; the top-``k`` token ids (..., k) and their probabilities (..., k) float32."""
        probs = torch.softmax(self.logits(self.decoder.norm(rows)).float(), dim=-1)
        top = probs.topk(k, dim=-1)
        return top.indices, top.values

    def target_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL (rows,) float32 of ``targets`` (rows,) given final-norm hidden rows (rows, d), differentiable
        in ``hidden``; through ``linear_nll`` (no (rows, vocab) tensor kept for backward) when the output
        projection is a frozen plain linear map."""
        head = self.model.lm_head
        if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
            return linear_nll(hidden, head.weight, targets)
        return torch.nn.functional.cross_entropy(self.logits(hidden).float(), targets, reduction="none")

    NLL_ROWS = 32  # rows per float32 log-softmax in next_token_nll

    def next_token_nll(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, previous_logits: torch.Tensor | None, chunk: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of ``input_ids`` (batch, n) and the float32 logits of the last position.

        Token i is scored by position i-1's logits; the block's first token by ``previous_logits``
        (NaN at the start of a document). Logits are formed in chunks to bound memory.

        hidden: (batch, n, d); previous_logits: (batch, vocab); returns nll (batch, n) float32 and the
        last position's logits (batch, vocab) float32.
        """
        batch, n = input_ids.shape
        ids = input_ids.to(self.device)
        nll = torch.full((batch, n), float("nan"), device=self.device)
        if previous_logits is not None:
            nll[:, 0] = torch.nn.functional.cross_entropy(previous_logits, ids[:, 0], reduction="none")
        last = None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = self.logits(hidden[:, s:e])
            targets_end = min(e, n - 1)
            # log-softmax in float32 over a few rows at a time: the fused kernel reads the low-precision
            # logits once and its float32 output stays in cache (3x faster on CPU than one big call).
            for r in range(s, targets_end, self.NLL_ROWS):
                r_end = min(targets_end, r + self.NLL_ROWS)
                logp = torch.log_softmax(logits[:, r - s : r_end - s], dim=-1, dtype=torch.float32)
                nll[:, r + 1 : r_end + 1] = -logp.gather(-1, ids[:, r + 1 : r_end + 1].unsqueeze(-1)).squeeze(-1)
            if e == n:
                last = logits[:, -1].to(torch.float32, copy=True)  # a copy: a view would keep the whole chunk alive
        return nll, last


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, the convention of Hugging Face checkpoints: x (batch, heads, P, head_dim) with cos/sin
    broadcastable to it, e.g. (1, 1, P, head_dim)."""
    # x*cos + rotate_half(x)*sin, written as two fused multiply-adds on the halves (no cat, no neg)
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out

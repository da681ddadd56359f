"""The streaming engine: feed a document of any length, block by block, and record its trace.

    >>> import famviz
    >>> lm = famviz.load_model()                       # the bundled SmolLM2-135M
    >>> stream = famviz.Stream(lm, famviz.FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=1))
    >>> result = stream.run_text(open("doc.txt").read())
    >>> result.trace["block.3.share"]                   # (blocks, heads, [fam, memory, block])

Tokens can be fed in pieces of any size (``feed`` / ``feed_text``): only whole blocks are run until
``finish`` runs the last, partial one, so the result equals feeding everything at once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from famviz.core.config import FamConfig
from famviz.core.fam_model import BlockOutput, FamModel, StreamState
from famviz.core.model import LoadedModel
from famviz.core.modes import BLOCK_GROUPS, FAM_GROUPS
from famviz.core.tokenize import IncrementalTokenizer
from famviz.core.trace import ChannelSelection, Trace

STAT_KEYS = ("block.share", "block.token_share", "fam.share", "fam.read", "fam.slot_received", "fam.slot_read")
STATE_KEYS = ("fam.state", "fam.norm", "fam.update", "fam.slot_norm", "fam.slot_update")  # read off the FAM


@dataclass
class BlockResult:
    """What one block produced (handed to ``on_block`` callbacks as the stream runs)."""

    index: int
    start: int  # absolute position of the block's first token
    token_ids: list[int]
    nll: np.ndarray  # (n,) float32
    seconds: float


@dataclass
class StreamResult:
    config: FamConfig
    tokens: int
    blocks: int
    nll: np.ndarray  # (tokens,) float32, NaN for the first token
    seconds: float
    state_bytes: int
    trace: Trace | None
    block_seconds: list[float] = field(default_factory=list)

    @property
    def nll_mean(self) -> float:
        finite = self.nll[np.isfinite(self.nll)]
        return float(finite.mean()) if finite.size else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


class Stream:
    """One document's pass through a FAM/BSWA/full model.

    ``channels``: trace channel patterns to record (None = all, see ``famviz.core.trace``);
    ``record=False`` keeps only the per-token NLL. ``on_block`` is called after every block.
    ``backend``: attention kernel when no trace statistics are needed (see ``famviz.core.attention``).
    ``compact_trace``: record ``fam.*.state`` as the mean of the FAM slots (1, d) instead of every
    slot (fam_len, d), so a trace of a very long document stays small (``famviz.core.trace``).
    ``lens_top_k``: tokens kept per FAM slot by the memory lens (``fam.*.lens``, opt-in).
    """

    def __init__(
        self,
        model: LoadedModel | FamModel,
        config: FamConfig | None = None,
        *,
        channels: Iterable[str] | None = None,
        record: bool = True,
        fam_prompt: torch.Tensor | None = None,
        backend: str = "sdpa",
        on_block: Callable[[BlockResult], None] | None = None,
        compact_trace: bool = False,
        lens_top_k: int = 5,
    ):
        if isinstance(model, FamModel):
            if config is not None and config != model.config:
                raise ValueError("config differs from the FamModel's own config")
            self.fam_model = model
        else:
            self.fam_model = FamModel(model, config or FamConfig(), fam_prompt=fam_prompt, backend=backend)
        self.config = self.fam_model.config
        self.loaded = self.fam_model.loaded
        self.state: StreamState = self.fam_model.initial_state()
        self.pending: list[int] = []
        self.on_block = on_block
        self.compact_trace = compact_trace
        if lens_top_k < 1:
            raise ValueError(f"lens_top_k must be at least 1, got {lens_top_k}")
        self.lens_top_k = lens_top_k
        self._nll: list[np.ndarray] = []
        self._block_seconds: list[float] = []
        self._seconds = 0.0
        self._text_tokenizer: IncrementalTokenizer | None = None
        n_layers = len(self.fam_model.layers)
        self.selection = ChannelSelection(channels, n_layers, fam=self.fam_model.fam_len > 0) if record else None
        self.trace = Trace(self._meta(), self.selection.layers) if record else None
        if self.trace is not None and "fam.lens" in self.selection:
            self.trace.meta.update(lens_top_k=lens_top_k, lens_vocab={})

    def _meta(self) -> dict:
        cfg = self.loaded.config
        return {
            "model": self.loaded.name,
            "adapter": self.loaded.adapter,  # None: the untuned conversion
            "model_type": cfg.model_type,
            "config": self.config.to_dict(),
            "fam_len": self.fam_model.fam_len,
            "n_layers": len(self.fam_model.layers),
            "n_heads": self.fam_model.n_heads,
            "hidden_size": self.fam_model.hidden_size,
            "dtype": str(self.fam_model.dtype).replace("torch.", ""),
            "device": str(self.fam_model.device),
            "fam_state_form": "slot-mean" if self.compact_trace else "slots",
            "block_share_groups": list(BLOCK_GROUPS),
            "fam_share_groups": list(FAM_GROUPS),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    # -- feeding -----------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self.state.position

    def feed(self, token_ids: Sequence[int]) -> list[BlockResult]:
        """Queue tokens and run every block that is complete."""
        self.pending.extend(int(t) for t in token_ids)
        results = []
        block = self.config.block_size
        done = 0  # consumed tokens are dropped once at the end: slicing the queue per block is quadratic
        try:
            while len(self.pending) - done >= block:
                chunk = self.pending[done : done + block]
                done += block
                results.append(self._run_block(chunk))
        finally:
            del self.pending[:done]
        return results

    def blocks(self, token_ids: Sequence[int]) -> Iterator[BlockResult]:
        """Run ``token_ids`` (after any tokens queued by ``feed``) block by block, yielding each block's result
        as soon as it is done; the last block may be partial, so a full iteration equals ``run``. For token
        ids only: text queued by ``feed_text`` is tokenised and run by ``finish``. The one block loop
        of everything that reports per block (the app's tabs, the CLI's progress bar). Leaving the loop
        early keeps the state of the blocks that ran; call ``result()`` for the summary."""
        ids = [*self.pending, *(int(t) for t in token_ids)]
        self.pending = []
        block = self.config.block_size
        for start in range(0, len(ids), block):
            yield self._run_block(ids[start : start + block])

    def describe_document(
        self, name: str, text: str | None = None, offsets: Sequence[tuple[int, int]] | None = None
    ) -> None:
        """Name the streamed document (and give its text and token spans) in the trace, when recording."""
        if self.trace is not None:
            self.trace.describe_document(name, text, offsets)

    def feed_text(self, text: str) -> list[BlockResult]:
        """Queue a piece of text; tokens are committed once later text cannot change them."""
        if self._text_tokenizer is None:
            self._text_tokenizer = IncrementalTokenizer(self.loaded.tokenizer)
        ids, offsets = self._text_tokenizer.push(text)
        self._record_text(offsets)
        return self.feed(ids)

    def finish(self) -> StreamResult:
        """Run the final partial block (if any) and summarise the stream."""
        if self._text_tokenizer is not None:
            ids, offsets = self._text_tokenizer.flush()
            self._record_text(offsets)
            self.pending.extend(ids)
        if self.pending:
            chunk, self.pending = self.pending, []
            self._run_block(chunk)
        return self.result()

    def run(self, token_ids: Sequence[int]) -> StreamResult:
        self.feed(token_ids)
        return self.finish()

    def run_text(self, text: str) -> StreamResult:
        self.feed_text(text)
        return self.finish()

    def _record_text(self, offsets: list[tuple[int, int]]) -> None:
        if self.trace is not None:
            self.trace.text = self._text_tokenizer.text
            self.trace.offsets.extend(offsets)

    def result(self) -> StreamResult:
        nll = np.concatenate(self._nll) if self._nll else np.zeros(0, np.float32)
        return StreamResult(
            config=self.config,
            tokens=self.state.position,
            blocks=len(self._nll),
            nll=nll,
            seconds=self._seconds,
            state_bytes=self.state.nbytes(),
            trace=self.trace,
            block_seconds=list(self._block_seconds),
        )

    # -- one block ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _run_block(self, chunk: list[int]) -> BlockResult:
        started = time.perf_counter()
        ids = torch.tensor([chunk], dtype=torch.long)
        selection = self.selection
        with_stats = selection is not None and any(key in selection for key in STAT_KEYS)
        start = self.state.position
        out = self.fam_model.forward_block(ids, self.state, with_stats=with_stats)
        nll, last_logits = self.fam_model.next_token_nll(out.hidden, ids, self.state.last_logits)
        self.state = dataclasses.replace(out.state, last_logits=last_logits)
        nll_np = nll[0].cpu().numpy()
        if self.trace is not None:
            self.trace.append_block(start, chunk, self._block_values(out, nll_np))
        seconds = time.perf_counter() - started
        self._seconds += seconds
        self._nll.append(nll_np)
        self._block_seconds.append(seconds)
        result = BlockResult(index=len(self._nll) - 1, start=start, token_ids=chunk, nll=nll_np, seconds=seconds)
        if self.on_block is not None:
            self.on_block(result)
        return result

    def _block_values(self, out: BlockOutput, nll: np.ndarray) -> dict[str, np.ndarray]:
        """The selected channels of one block, with only the recorded layers, on the CPU."""
        layers = self.selection.layers
        values: dict[str, np.ndarray] = {}
        if "tokens.nll" in layers:
            values["tokens.nll"] = nll.astype(np.float32)

        def pick(key: str, per_layer: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
            if key in layers:
                values[key] = torch.stack([per_layer[layer] for layer in layers[key]]).to(dtype).cpu().numpy()

        if out.stats is not None:
            pick("block.share", [s.block_share[0] for s in out.stats])
            # per token: (heads, n, groups) -> (heads, groups, n), the token last as in every per-token kind
            pick("block.token_share", [s.token_share[0].permute(0, 2, 1) for s in out.stats], torch.float16)
            pick("fam.share", [s.fam_share[0] for s in out.stats])
            pick("fam.read", [s.fam_read[0] for s in out.stats], torch.float16)
            pick("fam.slot_received", [s.slot_received[0] for s in out.stats])
            pick("fam.slot_read", [s.slot_read[0] for s in out.stats], torch.float16)
        if self.fam_model.fam_len and any(key in layers for key in STATE_KEYS):
            # One batched op per channel over the recorded layers (not one small op per layer).
            wanted = sorted(set().union(*(layers.get(key, []) for key in STATE_KEYS)))
            new = torch.stack([out.state.fam[layer][0] for layer in wanted]).float()  # (layers, fam_len, d)
            row = {layer: i for i, layer in enumerate(wanted)}

            def put(key: str, per_layer: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
                if key in layers:
                    values[key] = per_layer[[row[layer] for layer in layers[key]]].to(dtype).cpu().numpy()

            state = new.mean(dim=1, keepdim=True) if self.compact_trace else new  # compact: the slots' mean
            # float16 keeps traces small; a drifting FAM can exceed its range, so clamp (never inf in a view)
            put("fam.state", state.clamp(-65504.0, 65504.0), torch.float16)
            put("fam.norm", new.norm(dim=-1).mean(dim=-1))
            put("fam.slot_norm", new.norm(dim=-1))
            if "fam.update" in layers or "fam.slot_update" in layers:
                old = torch.stack([out.fam_before[layer][0] for layer in wanted]).float()
                put("fam.update", 1 - torch.nn.functional.cosine_similarity(new.flatten(1), old.flatten(1), dim=1))
                put("fam.slot_update", 1 - torch.nn.functional.cosine_similarity(new, old, dim=-1))
        if "fam.lens" in layers:
            values.update(self._lens_values(out, layers["fam.lens"]))
        return values

    def _lens_values(self, out: BlockOutput, lens_layers: list[int]) -> dict[str, np.ndarray]:
        """The memory lens of the block's new FAM at ``lens_layers``; new token ids join the trace's vocabulary."""
        slots = torch.stack([out.state.fam[layer][0] for layer in lens_layers])  # (layers, fam_len, d)
        ids, probs = self.fam_model.lens(slots, min(self.lens_top_k, self.loaded.config.vocab_size))
        ids = ids.to(torch.int32).cpu().numpy()
        vocab = self.trace.meta["lens_vocab"]
        tokenizer = self.loaded.tokenizer
        for token_id in map(int, np.unique(ids)):
            if str(token_id) not in vocab:
                vocab[str(token_id)] = tokenizer.decode([token_id]) if tokenizer is not None else f"#{token_id}"
        return {"fam.lens": ids, "fam.lens_p": probs.to(torch.float16).cpu().numpy()}


def stream_tokens(model: LoadedModel, config: FamConfig, token_ids: Sequence[int], **kwargs) -> StreamResult:
    """Run a whole token sequence through a fresh stream."""
    return Stream(model, config, **kwargs).run(token_ids)

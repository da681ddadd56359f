"""The trace: what the engine records about its memory, block by block.

Every recorded quantity has a stable channel name (in the spirit of TransformerLens hook names).
This table is the one place they are defined; ``{layer}`` is a decoder layer index.

==========================  ============================  ===========================================
channel                     shape (per block / per token)  meaning
==========================  ============================  ===========================================
``tokens.nll``              per token, scalar              next-token NLL: -log p(token_i | tokens < i)
                                                           (NaN for the document's first token)
``block.{layer}.share``     per block, (heads, 4)          share of attention mass that block queries
                                                           put on [FAM, memory blocks, own block, sink
                                                           tokens], mean over the block's queries
``block.{layer}.token_share`` per token, (heads, 4) fp16 opt-in: each block token's own share on [FAM, memory
                                                           blocks, own block, sink tokens] (not averaged)
``fam.{layer}.share``       per block, (heads, 2)          share that FAM queries put on
                                                           [previous FAM, current block], mean over slots
``fam.{layer}.read``        per token, scalar              attention probability FAM queries give the
                                                           token, mean over heads and slots
``fam.{layer}.state``       per block, (fam_len, d) fp16   the FAM this layer hands to the next block;
                            or (1, d) in the compact form  in the compact form the mean of its slots
``fam.{layer}.norm``        per block, scalar              mean L2 norm of the state's slots
``fam.{layer}.update``      per block, scalar              1 - cosine(flattened state, previous state)
``fam.{layer}.lens``        per block, (fam_len, k) int32  memory lens (opt-in): each slot of the state
                                                           decoded through the final norm and the
                                                           unembedding, its top-k token ids
``fam.{layer}.lens_p``      per block, (fam_len, k) fp16   ... and their probabilities
``fam.{layer}.slot_norm``   per block, (fam_len,)          per-slot views (opt-in): each slot's L2 norm
``fam.{layer}.slot_update`` per block, (fam_len,)          1 - cosine(slot, the slot after the block before)
``fam.{layer}.slot_received`` per block, (fam_len,)        attention probability the block's queries give
                                                           each slot, mean over heads and queries
``fam.{layer}.slot_read``   per token, (fam_len,) fp16     each slot's attention probability on the token,
                                                           mean over heads ("what this slot read")
==========================  ============================  ===========================================

Shares are exact (sums of softmax probabilities) and sum to 1 per query group. In ``full`` mode
"memory blocks" means every earlier token; ``fam.*`` channels exist only in ``fam`` mode.

Compact form (``Stream(..., compact_trace=True)``, meta ``fam_state_form == "slot-mean"``): the full
state is fam_len·d·2 bytes per layer per block (2.2 MB per block on the bundled model, 0.6 GB for a
64k-token document), the only channel that grows that fast. The compact form keeps the mean over
slots (1/fam_len of it, enough for state trajectories); ``fam.*.norm`` and ``fam.*.update`` are still
computed from the full state, and every other channel is unchanged.

Opt-in channels (the memory lens, the per-slot views) cost a vocabulary-sized product per slot and layer
(the lens) or fam_len values per layer and block or token (the per-slot views at every layer would make a
trace several times today's), so ``*`` and the default selection leave them out: a pattern records them
only when it names their kind (``fam.*.lens``, ``fam.29.slot_read``). ``lens`` and ``lens_p`` are always
recorded together, at the same layers; meta ``lens_top_k`` is k and ``lens_vocab`` maps every token id the
lens shows to its text, so that a trace replays its lens without the model's tokenizer (``Trace.token_text``).

A trace saves to one ``.npz`` file (arrays plus a JSON metadata record) and reloads without the model.
Version 2 added the lens and the per-slot views; a version-1 trace loads as one that did not record them.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from famviz.core.modes import BLOCK_GROUPS
from famviz.errors import FamvizError

TRACE_FORMAT = "famviz-trace"
TRACE_VERSION = 2
LENS_KEYS = ("fam.lens", "fam.lens_p")  # recorded together


@dataclass(frozen=True)
class ChannelKind:
    """One family of channels: ``pattern`` with ``{layer}``, or a single global channel."""

    pattern: str
    per_token: bool  # one value per token (else one entry per block)
    fam_only: bool
    dtype: str
    doc: str
    opt_in: bool = False  # recorded only when a pattern names the kind (see the module's docstring)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.pattern

    def key(self) -> str:
        """Storage key in a trace file: the pattern without the layer index."""
        return self.pattern.replace(".{layer}", "")


CHANNEL_KINDS: tuple[ChannelKind, ...] = (
    ChannelKind("tokens.nll", True, False, "float32", "next-token negative log-likelihood"),
    ChannelKind(
        "block.{layer}.share",
        False,
        False,
        "float32",
        "block queries' attention share on [fam, memory, block, sink] per head",
    ),
    ChannelKind(
        "block.{layer}.token_share", True, False, "float16", "each token's own share per head (opt-in)", opt_in=True
    ),
    ChannelKind("fam.{layer}.share", False, True, "float32", "FAM queries' attention share on [fam, block] per head"),
    ChannelKind("fam.{layer}.read", True, True, "float16", "how much FAM queries read each token"),
    ChannelKind("fam.{layer}.state", False, True, "float16", "FAM state handed to the next block"),
    ChannelKind("fam.{layer}.norm", False, True, "float32", "mean slot L2 norm of the FAM state"),
    ChannelKind("fam.{layer}.update", False, True, "float32", "1 - cosine to the previous FAM state"),
    ChannelKind("fam.{layer}.lens", False, True, "int32", "memory lens: each FAM slot's top-k tokens", opt_in=True),
    ChannelKind("fam.{layer}.lens_p", False, True, "float16", "memory lens: their probabilities", opt_in=True),
    ChannelKind("fam.{layer}.slot_norm", False, True, "float32", "each FAM slot's L2 norm", opt_in=True),
    ChannelKind("fam.{layer}.slot_update", False, True, "float32", "each slot's 1 - cosine to before", opt_in=True),
    ChannelKind(
        "fam.{layer}.slot_received", False, True, "float32", "block queries' attention on each slot", opt_in=True
    ),
    ChannelKind("fam.{layer}.slot_read", True, True, "float16", "each slot's attention on each token", opt_in=True),
)
SLOT_KEYS = ("fam.slot_norm", "fam.slot_update", "fam.slot_received", "fam.slot_read")
KINDS_BY_KEY = {kind.key(): kind for kind in CHANNEL_KINDS}


def channel_names(n_layers: int, fam: bool = True) -> list[str]:
    """Every channel name for a model with ``n_layers`` layers."""
    names = []
    for kind in CHANNEL_KINDS:
        if kind.fam_only and not fam:
            continue
        if kind.per_layer:
            names.extend(kind.pattern.format(layer=layer) for layer in range(n_layers))
        else:
            names.append(kind.pattern)
    return names


def _selects(pattern: str, name: str) -> bool:
    """Whether ``pattern`` records channel ``name``: an opt-in kind only where the pattern names it."""
    if not fnmatch.fnmatchcase(name, pattern):
        return False
    kind = KINDS_BY_KEY[_kind_key(name)]
    return not kind.opt_in or pattern.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]


def _kind_key(name: str) -> str:
    parts = name.split(".")
    return name if len(parts) == 2 else f"{parts[0]}.{parts[2]}"


class ChannelSelection:
    """Which channels to record: for each kind, the layers it is recorded at.

    Patterns are shell-style (``fam.*.state``, ``block.3.share``, ``tokens.nll``, ``*``); opt-in kinds
    (the memory lens) only by a pattern that names them (``fam.*.lens``).
    """

    def __init__(self, patterns: Iterable[str] | None, n_layers: int, fam: bool):
        patterns = ["*"] if patterns is None else list(patterns)
        self.n_layers = n_layers
        self.layers: dict[str, list[int]] = {}
        for name in channel_names(n_layers, fam):
            if not any(_selects(p, name) for p in patterns):
                continue
            parts = name.split(".")
            key = _kind_key(name)
            layer = int(parts[1]) if len(parts) == 3 else -1
            self.layers.setdefault(key, [])
            if layer >= 0:
                self.layers[key].append(layer)
        lens_layers = sorted(set().union(*(self.layers.get(key, []) for key in LENS_KEYS)))
        if lens_layers:
            self.layers.update({key: list(lens_layers) for key in LENS_KEYS})
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in channel_names(n_layers, True))]
        if unknown:
            raise FamvizError(
                f"unknown trace channel pattern(s): {', '.join(unknown)}; "
                f"channels are {', '.join(k.pattern for k in CHANNEL_KINDS)}"
            )

    def __contains__(self, key: str) -> bool:
        return key in self.layers

    @property
    def empty(self) -> bool:
        return not self.layers


class Trace:
    """Recorded channels of one streamed document.

    Arrays are stored per kind with a layer axis holding only the recorded layers
    (``layers_of(key)``); use ``trace["fam.3.state"]`` for one channel, or ``array(key)`` for a kind.
    Per-block arrays have the block as first axis; per-token arrays the token as last axis.
    """

    def __init__(self, meta: dict, layers: dict[str, list[int]]):
        self.meta = meta
        self._layers = {k: list(v) for k, v in layers.items()}
        self._chunks: dict[str, list[np.ndarray]] = {k: [] for k in layers}
        self._stacked: dict[str, np.ndarray] = {}
        self.token_ids: list[int] = []
        self.block_starts: list[int] = []
        self.text: str | None = None  # the document, when known (for token views)
        self.offsets: list[tuple[int, int]] = []  # per token (start, end) character span in ``text``

    # -- recording ---------------------------------------------------------------------------
    def append_block(self, start: int, token_ids: Sequence[int], values: dict[str, np.ndarray]) -> None:
        """Add one block: ``values[key]`` has a leading layer axis (recorded layers) where per layer."""
        self.block_starts.append(int(start))
        self.token_ids.extend(int(t) for t in token_ids)
        for key, value in values.items():
            self._chunks[key].append(value)
            self._stacked.pop(key, None)

    # -- what the trace is about (set by whoever streams; saved with the file) ----------------------------
    def describe_document(
        self, name: str, text: str | None = None, offsets: Sequence[tuple[int, int]] | None = None
    ) -> None:
        """The document's name and, when known, its text and each token's (start, end) character span."""
        self.meta["document"] = name
        if text is not None:
            self.text = text
        if offsets is not None:
            self.offsets = [tuple(span) for span in offsets]

    def set_notes(self, notes: Sequence[str]) -> None:
        """What the run's status said about its settings (e.g. how they differ from the adapter's training)."""
        self.meta["notes"] = list(notes)

    def record_comparison(self, mode: str, block_nll: Sequence[float]) -> None:
        """The per-block mean NLL of the same document in a second mode (None where not finite)."""
        self.meta["compare"] = {"mode": mode, "block_nll": [float(v) if np.isfinite(v) else None for v in block_nll]}

    @property
    def document_name(self) -> str | None:
        return self.meta.get("document")

    @property
    def notes(self) -> list[str]:
        return list(self.meta.get("notes", []))

    @property
    def comparison(self) -> tuple[str | None, list[float]]:
        """(compared mode, per-block mean NLL with NaN for missing values); (None, []) without a comparison."""
        compare = self.meta.get("compare") or {}
        return compare.get("mode"), [float("nan") if v is None else float(v) for v in compare.get("block_nll", [])]

    # -- reading -----------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return list(self._chunks)

    @property
    def n_blocks(self) -> int:
        return len(self.block_starts)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def layers_of(self, key: str) -> list[int]:
        return self._layers[key]

    def array(self, key: str) -> np.ndarray:
        """The whole kind as one array (blocks first for per-block kinds; tokens last for per-token)."""
        if key not in self._chunks:
            raise KeyError(f"channel kind {key!r} was not recorded; recorded: {', '.join(self.keys)}")
        if key not in self._stacked:
            kind = KINDS_BY_KEY[key]
            chunks = self._chunks[key]
            if kind.per_token:
                shape = (len(self._layers[key]), 0) if kind.per_layer else (0,)
                if chunks:  # a slot axis (fam.slot_read) comes between the layers and the tokens
                    shape = chunks[0].shape[:-1] + (0,)
                self._stacked[key] = np.concatenate(chunks, axis=-1) if chunks else np.zeros(shape, kind.dtype)
            else:
                self._stacked[key] = np.stack(chunks) if chunks else np.zeros((0,), kind.dtype)
        return self._stacked[key]

    def latest(self, key: str) -> np.ndarray:
        """The last block's value of a per-block kind (recorded layers first where per layer)."""
        if KINDS_BY_KEY[key].per_token:
            raise KeyError(f"{key!r} is recorded per token, not per block")
        chunks = self._chunks.get(key)
        if not chunks:
            raise KeyError(f"channel kind {key!r} has no recorded block")
        return chunks[-1]

    def __getitem__(self, name: str) -> np.ndarray:
        parts = name.split(".")
        if len(parts) == 2:
            return self.array(name)
        if len(parts) != 3 or not parts[1].isdigit():
            raise KeyError(f"not a channel name: {name!r}")
        key, layer = f"{parts[0]}.{parts[2]}", int(parts[1])
        layers = self.layers_of(key) if key in self._layers else []
        if layer not in layers:
            raise KeyError(f"channel {name!r} was not recorded")
        index = layers.index(layer)
        arr = self.array(key)
        return arr[index] if KINDS_BY_KEY[key].per_token else arr[:, index]

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True

    @property
    def channels(self) -> list[str]:
        names = []
        for key, layers in self._layers.items():
            kind = KINDS_BY_KEY[key]
            names.extend(kind.pattern.format(layer=layer) for layer in layers) if kind.per_layer else names.append(key)
        return names

    def token_text(self, token_id: int) -> str:
        """A token's text as the memory lens recorded it (``#id`` where the trace does not know it)."""
        return self.meta.get("lens_vocab", {}).get(str(int(token_id)), f"#{int(token_id)}")

    def nbytes(self) -> int:
        return sum(c.nbytes for chunks in self._chunks.values() for c in chunks)

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = dict(
            self.meta, format=TRACE_FORMAT, version=TRACE_VERSION, layers=self._layers, has_text=self.text is not None
        )
        arrays = {f"channel/{key}": self.array(key) for key in self.keys}
        arrays["token_ids"] = np.asarray(self.token_ids, dtype=np.int64)
        arrays["block_starts"] = np.asarray(self.block_starts, dtype=np.int64)
        arrays["offsets"] = np.asarray(self.offsets, dtype=np.int64).reshape(-1, 2)
        arrays["text_utf8"] = np.frombuffer((self.text or "").encode("utf-8"), dtype=np.uint8)
        arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by ``save``. Every failure is one ``FamvizError`` line naming the file (not
        its directory: in the app it is a server path) and why; nothing in the file is ever unpickled."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta_json"]).decode("utf-8"))
                if meta.get("format") != TRACE_FORMAT:
                    raise FamvizError(f"{path.name} is not a famviz trace file (an .npz archive of something else)")
                if meta.get("version", 0) > TRACE_VERSION:
                    raise FamvizError(f"{path.name} was written by a newer famviz (trace version {meta['version']})")
                layers = {k: list(v) for k, v in meta.pop("layers").items()}
                meta.pop("format"), meta.pop("version")
                has_text = meta.pop("has_text", False)
                trace = cls(meta, layers)
                trace.token_ids = data["token_ids"].tolist()
                trace.block_starts = data["block_starts"].tolist()
                trace.offsets = [tuple(pair) for pair in data["offsets"].tolist()]
                trace.text = bytes(data["text_utf8"]).decode("utf-8") if has_text else None
                for key in layers:
                    arr = data[f"channel/{key}"]
                    if key == "block.share" and arr.shape[-1] == len(BLOCK_GROUPS) - 1:
                        arr = _with_sink_column(arr)  # written before sink mode: no sink tokens, share 0
                        trace.meta["block_share_groups"] = list(BLOCK_GROUPS)
                    trace._stacked[key] = arr
                    trace._chunks[key] = [arr] if KINDS_BY_KEY[key].per_token else list(arr)
        except FamvizError:
            raise
        except FileNotFoundError:
            raise FamvizError(f"trace file {path.name} does not exist") from None
        except Exception as exc:  # noqa: BLE001 - any damage to the file is the same message
            reason = "the file is empty" if path.is_file() and path.stat().st_size == 0 else _unreadable_reason(exc)
            raise FamvizError(f"{path.name} is not a famviz trace file ({reason})") from None
        return trace


def _with_sink_column(share: np.ndarray) -> np.ndarray:
    return np.concatenate([share, np.zeros(share.shape[:-1] + (1,), share.dtype)], axis=-1)


def _unreadable_reason(exc: Exception) -> str:
    """Why a file is no readable trace, in words (numpy's own messages suggest unsafe pickle loading)."""
    import zipfile

    if isinstance(exc, (zipfile.BadZipFile, EOFError)):
        return "the archive is damaged or cut short"
    if isinstance(exc, KeyError):
        return f"it lacks the entry {exc.args[0] if exc.args else '?'}"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return "its description is unreadable"
    if isinstance(exc, ValueError):
        return "not a NumPy .npz archive"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__

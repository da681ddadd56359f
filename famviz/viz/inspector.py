"""The live memory inspector's model-free half: one run's views of a trace, kept per browser session.

``Run`` wraps a trace as it grows (or one loaded from a file) and turns it into the app's figures
and the shaded document. Nothing here needs gradio or a model, so the app, the export command and
the tests share it.

    >>> run = Run.from_trace(famviz.Trace.load("run.npz"), name="run.npz")
    >>> run.heatmap(), run.heads(), run.trajectory(), run.dynamics(), run.loss(), run.document_html()
    >>> run.lens(), run.slots()                      # memory lens and per-slot views, where recorded

Bounds for long documents: figures draw at most ``figures.MAX_BLOCK_COLUMNS`` block columns; the
document view shows the selected block and the one before it (at most ``MAX_WINDOW_TOKENS``
tokens) plus a downsampled list of the most-read words of earlier blocks; FAM trajectories keep a
small random projection of each state (``TRAJECTORY_DIMS`` per slot), never the N×N attention.
"""

from __future__ import annotations

import html
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from famviz.core.config import FamConfig
from famviz.core.model import describe_model
from famviz.core.trace import Trace
from famviz.viz import figures

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformers import PreTrainedTokenizerBase

DEFAULT_VIEW = "block-fam"
TRAJECTORY_METHODS = ("PCA", "UMAP")
TRAJECTORY_DIMS = 32  # random projection of each FAM slot: distances are kept (Johnson–Lindenstrauss)
MAX_WINDOW_TOKENS = 1200  # tokens shaded in the document view
MAX_HISTORY_ROWS = 40  # earlier blocks listed with their most-read words
SHADES = 10  # shade classes in the document view (a class per token keeps the HTML small)
# Sink-like targets of the FAM's reads, measured on GPL-3 with the shipped adapter (docs/probes.md,
# scripts/fam_read_targets.py): each block's first token takes 20% of the read mass (52x the mean token), and
# of the 40 most-read tokens 40 are block starts, whitespace, punctuation or these common words, none a
# content word. "Content tokens only" leaves them out of the shading.
COMMON_WORDS = frozenset(
    "the a an of to and or in is are was be by for on as at it its this that with from you your any not "
    "if no all may can will such".split()
)


MAX_LENS_LAYERS = 4  # each costs a vocabulary-sized product per FAM slot and block (~4% of a block each)
# Recorded at the app's slot layers: the memory lens and the per-slot views.
SLOT_LAYER_KINDS = ("lens", "slot_norm", "slot_update", "slot_received", "slot_read")


def app_channels(trajectory_layers: list[int] | None, fam: bool, lens_layers: list[int] | None = None) -> list[str]:
    """What the inspector records: per-block aggregates, FAM reads per token, the FAM states of the
    trajectory layers only (a state is fam_len × hidden per layer and block) and the memory lens and
    per-slot views of ``lens_layers`` (the slot layers)."""
    channels = ["tokens.nll", "block.*.share"]
    if fam:
        channels += ["fam.*.share", "fam.*.read", "fam.*.norm", "fam.*.update"]
        channels += [f"fam.{layer}.state" for layer in trajectory_layers or []]
        for layer in lens_layers or []:
            channels += [f"fam.{layer}.{kind}" for kind in SLOT_LAYER_KINDS]
    return channels


def default_trajectory_layers(n_layers: int) -> list[int]:
    """First, middle and last layer."""
    return sorted({0, n_layers // 2, n_layers - 1})


def default_lens_layers(n_layers: int) -> list[int]:
    """The last layer: its FAM slots are closest to what the unembedding reads."""
    return [n_layers - 1]


def parse_layers(
    text: str | None,
    n_layers: int,
    what: str = "trajectory layers",
    default: list[int] | None = None,
    most: int = len(figures.TRAJECTORY_COLORS),
) -> list[int]:
    """'0, 15, 29' -> [0, 15, 29] (negative counts from the top); empty -> ``default`` (the trajectory
    defaults when None). Raises ValueError with a readable message naming ``what``."""
    if text is None or not str(text).strip():
        return default_trajectory_layers(n_layers) if default is None else list(default)
    layers = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.lstrip("-").isdigit():
            raise ValueError(f"{what} must be whole numbers separated by commas, got {part!r}")
        layer = int(part)
        if layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"{what[:-1]} {part} does not exist: the model has layers 0 to {n_layers - 1}")
        layers.append(layer)
    if len(set(layers)) > most:
        raise ValueError(f"pick at most {most} {what}")
    return sorted(set(layers))


# -- FAM state trajectories ------------------------------------------------------------------------------
class StateFeatures:
    """Compact per-block features of FAM states: each slot projected to ``TRAJECTORY_DIMS`` dims
    with a fixed random matrix, so trajectories of long runs cost kilobytes, not megabytes."""

    def __init__(self, layers: list[int]):
        self.layers = list(layers)
        self._rows: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        self._matrix: np.ndarray | None = None

    def _project(self, state: np.ndarray) -> np.ndarray:
        state = np.asarray(state, dtype=np.float32)
        if self._matrix is None or self._matrix.shape[0] != state.shape[-1]:
            rng = np.random.default_rng(0)
            self._matrix = rng.standard_normal((state.shape[-1], TRAJECTORY_DIMS)).astype(np.float32)
            self._matrix /= np.sqrt(TRAJECTORY_DIMS)
        return (state @ self._matrix).reshape(-1)

    def add(self, layer: int, state: np.ndarray) -> None:
        """``state``: one layer's FAM after a block, (fam_len, hidden)."""
        self._rows[layer].append(self._project(state))

    def array(self, layer: int) -> np.ndarray:
        rows = self._rows[layer]
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    @property
    def n_blocks(self) -> int:
        return min((len(rows) for rows in self._rows.values()), default=0)

    @classmethod
    def from_trace(cls, trace: Trace) -> StateFeatures:
        layers = trace.layers_of("fam.state") if "fam.state" in trace.keys else []
        features = cls(layers)
        for layer in layers:
            for state in trace.array("fam.state")[:, layers.index(layer)]:
                features.add(layer, state)
        return features


def pca_2d(features: np.ndarray, max_fit: int = 128) -> np.ndarray:
    """(n, D) -> (n, 2) principal components (fitted on at most ``max_fit`` evenly spread rows).

    Solved on the small n × n Gram matrix: LAPACK's SVD of a wide matrix is far slower (and threads
    badly on a busy machine), and this runs after every block.
    """
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n == 0:
        return np.zeros((0, 2))
    centred = features - features.mean(axis=0)
    fit = centred if n <= max_fit else centred[np.linspace(0, n - 1, max_fit).round().astype(int)]
    if n < 2 or not np.any(fit):
        return np.zeros((n, 2))
    values, vectors = np.linalg.eigh(fit @ fit.T)  # ascending
    axes = np.zeros((2, features.shape[1]))
    for k in range(2):
        value = values[-1 - k]
        if value > 1e-12 * max(values[-1], 1e-300):
            axes[k] = fit.T @ vectors[:, -1 - k] / np.sqrt(value)  # unit principal direction
            if axes[k, np.argmax(np.abs(axes[k]))] < 0:  # a fixed sign: the picture does not flip per block
                axes[k] = -axes[k]
    return centred @ axes.T


def scaled(coords: np.ndarray) -> np.ndarray:
    """Coordinates divided by their largest absolute value, so layers of very different state
    norms share one plot (their shapes compare, their sizes do not)."""
    top = float(np.abs(coords).max()) if coords.size else 0.0
    return coords / top if top > 0 else coords


def umap_2d(features: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, 2) with UMAP (slow: numba compiles on first use; call it off the UI thread)."""
    n = len(features)
    if n < 4:
        return pca_2d(features)
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), random_state=0, init="random", n_jobs=1)
    return reducer.fit_transform(np.asarray(features, dtype=np.float32))


_UMAP_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="famviz-umap")


# -- the document, shaded by FAM reads --------------------------------------------------------------------
def _shade_css(scope: str) -> str:
    rules = [
        f"{scope} .tok{{white-space:pre-wrap;border-radius:2px}}",
        f"{scope} .cur{{outline:2px solid #e4572e;outline-offset:2px;display:inline}}",
        f"{scope} .doc{{font:13px/1.7 ui-monospace,Menlo,Consolas,monospace;max-height:420px;overflow:auto;"
        "padding:6px;border:1px solid #ddd;border-radius:6px;background:#fff;color:#222}",
        f"{scope} .hist{{font:12px/1.5 system-ui,sans-serif;color:#444;max-height:160px;overflow:auto}}",
        f"{scope} .legend span{{display:inline-block;width:18px;height:12px}}",
    ]
    for level in range(1, SHADES + 1):
        alpha = level / SHADES * 0.85
        rules.append(f"{scope} .s{level}{{background:rgba(228,87,46,{alpha:.2f})}}")
    return "<style>" + "\n".join(rules) + "</style>"


def slot_read_layer(trace: Trace, layer: int | None) -> int | None:
    """The layer whose per-slot reads the document shows for a chosen slot: ``layer`` where recorded, else the
    top recorded one (None: no per-slot reads in the trace)."""
    if "fam.slot_read" not in trace.keys or not trace.layers_of("fam.slot_read"):
        return None
    layers = trace.layers_of("fam.slot_read")
    return layer if layer in layers else layers[-1]


def token_reads(trace: Trace, layer: int | None, slot: int | None = None) -> np.ndarray | None:
    """Per token, how much FAM queries read it: one layer's ``fam.read``, or the mean over layers; with
    ``slot``, that FAM slot's own reads (``fam.*.slot_read``, see ``slot_read_layer``)."""
    if slot is not None and (shown := slot_read_layer(trace, layer)) is not None and trace.n_tokens:
        reads = trace[f"fam.{shown}.slot_read"]
        return reads[slot].astype(np.float32) if 0 <= slot < len(reads) else None
    if "fam.read" not in trace.keys or trace.n_tokens == 0:
        return None
    reads = trace.array("fam.read")
    if layer is None:
        return reads.astype(np.float32).mean(axis=0)
    layers = trace.layers_of("fam.read")
    if layer not in layers:
        return None
    return reads[layers.index(layer)].astype(np.float32)


def sink_like(text: str, position: int, block_starts: set[int]) -> bool:
    """Whether a token is a sink-like target of FAM reads: its block's first token, whitespace, punctuation
    or a common word (``COMMON_WORDS``)."""
    word = text.strip()
    return position in block_starts or not word or all(not c.isalnum() for c in word) or word.lower() in COMMON_WORDS


def content_only(reads: np.ndarray, texts: list[str], start: int, block_starts: set[int]) -> np.ndarray:
    """``reads`` of the tokens from ``start`` (their ``texts``) with the sink-like ones set to NaN."""
    out = np.array(reads, dtype=np.float32)
    for i, text in enumerate(texts):
        if sink_like(text, start + i, block_starts):
            out[i] = np.nan
    return out


def _token_texts(trace: Trace, start: int, stop: int, tokenizer: PreTrainedTokenizerBase | None = None) -> list[str]:
    if trace.text is not None and len(trace.offsets) >= stop:
        return [trace.text[a:b] for a, b in trace.offsets[start:stop]]
    if tokenizer is not None:
        return [tokenizer.decode([t]) for t in trace.token_ids[start:stop]]
    return [f"‹{t}›" for t in trace.token_ids[start:stop]]


def document_html(
    trace: Trace | None,
    block: int | None = None,
    layer: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    slot: int | None = None,
    content: bool = False,
    shading: tuple[np.ndarray, str] | None = None,
) -> str:
    """The document around ``block`` (default: the latest) with each token shaded by its FAM read (with
    ``slot``: by what that FAM slot read, where the trace has per-slot reads; with ``content``: sink-like
    tokens left unshaded and out of the scale and the most-read lists, see ``sink_like``; with ``shading``
    = (per-token values, what they are), by those values instead, e.g. an attribution).

    Shades are relative to the largest read in the window (stated in the legend); hover a token
    for its position and value. Earlier blocks appear as a short list of their most-read words.
    """
    scope = "#famviz-doc"
    if trace is None or trace.n_blocks == 0:
        return f'<div id="famviz-doc">{_shade_css(scope)}<div class="doc">No document streamed yet.</div></div>'
    n_blocks = trace.n_blocks
    block = n_blocks - 1 if block is None else int(min(max(block, 0), n_blocks - 1))
    starts = list(trace.block_starts) + [trace.n_tokens]
    slot_layer = slot_read_layer(trace, layer) if slot is not None else None
    if shading is not None:
        reads, label = shading
    elif slot_layer is not None:
        reads, label = token_reads(trace, layer, slot), f"FAM read (slot {slot} of layer {slot_layer})"
    else:
        where = "mean over layers" if layer is None else f"layer {layer}"
        reads, label = token_reads(trace, layer), f"FAM read ({where})"
    first_block = max(0, block - 1)
    lo = max(starts[first_block], starts[block + 1] - MAX_WINDOW_TOKENS)
    hi = starts[block + 1]
    texts = _token_texts(trace, lo, hi, tokenizer)
    parts = [f'<div id="famviz-doc">{_shade_css(scope)}']
    if reads is None:
        parts.append('<p class="hist">No FAM reads in this run (they exist only in fam mode); tokens are unshaded.</p>')
        window = np.zeros(hi - lo, np.float32)
        top = 0.0
    else:
        window = reads[lo:hi]
        if content:
            window = content_only(window, texts, lo, set(trace.block_starts))
            label += ", content tokens only"
        finite = window[np.isfinite(window)]
        top = float(np.quantile(finite, 0.99)) if finite.size else 0.0
        legend = "".join(f'<span class="s{level}"></span>' for level in range(1, SHADES + 1))
        parts.append(
            f'<p class="hist legend">{label}, shade relative to {top:.4g} '
            f"(99th percentile in view): 0 {legend} ≥ {top:.3g}. Framed: block {block}.</p>"
        )
    parts.append('<div class="doc">')
    in_current = False
    for i, text in enumerate(texts):
        position = lo + i
        if position == starts[block] and not in_current:
            parts.append(f'<span class="cur" title="block {block}">')
            in_current = True
        value = float(window[i])
        level = 0 if top <= 0 or not np.isfinite(value) else min(SHADES, int(np.ceil(value / top * SHADES)))
        klass = f"tok s{level}" if level else "tok"
        block_of = block if position >= starts[block] else first_block
        read = (
            f"read {value:.4g}" if np.isfinite(value) else f"read {float(reads[position]):.4g}, sink-like: not shaded"
        )
        parts.append(
            f'<span class="{klass}" title="token {position:,} · block {block_of} · {read}">{html.escape(text)}</span>'
        )
    if in_current:
        parts.append("</span>")
    parts.append("</div>")
    if reads is not None and first_block > 0:
        parts.append(_history_html(trace, reads, starts, first_block, tokenizer, content))
    parts.append("</div>")
    return "".join(parts)


def _history_html(
    trace: Trace,
    reads: np.ndarray,
    starts: list[int],
    before: int,
    tokenizer: PreTrainedTokenizerBase | None,
    content: bool = False,
) -> str:
    """Earlier blocks (at most ``MAX_HISTORY_ROWS``, evenly spread) with their three most-read words
    (with ``content``, of the tokens that are not sink-like)."""
    rows = np.unique(np.linspace(0, before - 1, min(before, MAX_HISTORY_ROWS)).round().astype(int))
    items = []
    for b in rows[::-1]:
        a, z = starts[b], starts[b + 1]
        part = reads[a:z]
        if content:
            part = content_only(part, _token_texts(trace, a, z, tokenizer), a, {a})
            part = np.where(np.isfinite(part), part, -np.inf)
        if not part.size or not np.isfinite(part).any():
            continue
        best = [j for j in np.argsort(part)[::-1][:3] if np.isfinite(part[j])]
        words = [
            f"{html.escape(_token_texts(trace, a + int(j), a + int(j) + 1, tokenizer)[0].strip() or '␣')} "
            f"({part[j]:.3g})"
            for j in best
        ]
        items.append(f"<li>block {b}: {', '.join(words)}</li>")
    shown = "all earlier blocks" if len(rows) == before else f"{len(rows)} of {before} earlier blocks"
    return f'<div class="hist"><b>Most-read tokens, {shown}:</b><ul>{"".join(items)}</ul></div>'


def _idle_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


# -- one run ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One streamed (or replayed) document and what the session is looking at.

    Kept in the browser session's ``gr.State``: the stream handler appends to it, view controls
    change its selections, Stop sets ``state``.
    """

    config: FamConfig
    document: str
    total_tokens: int  # tokens this run streams
    trace: Trace | None = None
    document_cut: str | None = None  # how much of the document max tokens left out, e.g. "of 7,658 tokens"
    compare_mode: str | None = None
    compare_nll: list[float] = field(default_factory=list)  # per-block mean NLL of the compared mode
    features: StateFeatures | None = None
    view: str = DEFAULT_VIEW  # a figures.SHARE_VIEWS key
    layer: int | None = None  # the document's shading layer (None = mean over layers)
    slot: int | None = None  # the FAM slot whose reads shade the document (None: all slots)
    content_only: bool = False  # the document's shading leaves sink-like tokens out (``sink_like``)
    token: int | None = None  # the drill-down's token (None: the block's mean over its tokens)
    model_key: tuple | None = None  # the Model panel's choice that streamed it (None: replayed, no model)
    attribution: tuple[int, np.ndarray] | None = None  # (target position, |gradient × input| per earlier token)
    block: int | None = None  # drill-down block (None = follow the latest)
    method: str = "PCA"
    blocks_done: int = 0
    tokens_done: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0
    engine_seconds: float = 0.0  # time spent inside the engine (the app's own cost is the rest)
    state: str = "streaming"  # streaming | done | stopped | failed | replayed
    error: str = ""
    notes: list[str] = field(
        default_factory=list
    )  # shown under the status, e.g. settings the adapter was not trained with
    umap_result: tuple[int, dict] | None = None  # (blocks covered, layer -> coords)
    umap_future: Future | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Set while no block is being computed (the stream clears it around each block; Stop waits for it).
    idle: threading.Event = field(default_factory=_idle_event, repr=False)

    def __post_init__(self) -> None:
        self._own_view_if_missing()

    def _own_view_if_missing(self) -> None:
        """A view this run's mode lacks gives way to the mode's own (a sink run opens on its sink tokens, not
        on a blank FAM plot)."""
        if figures.missing_view(self.config, self.view):
            self.view = figures.default_view(self.config)

    @classmethod
    def from_trace(cls, trace: Trace, name: str) -> Run:
        """A finished run rebuilt from a saved trace (no model needed)."""
        config = FamConfig(**trace.meta.get("config", {}))
        compare_mode, compare_nll = trace.comparison
        run = cls(
            config=config,
            document=trace.document_name or name,
            total_tokens=trace.n_tokens,
            trace=trace,
            compare_mode=compare_mode,
            compare_nll=compare_nll,
            features=StateFeatures.from_trace(trace),
            state="replayed",
            notes=trace.notes,
        )
        run.blocks_done, run.tokens_done = trace.n_blocks, trace.n_tokens
        return run

    def keep_view_of(self, previous: Run | None) -> None:
        """Carry the share view and trajectory method over from the session's previous run (the view only
        where this run's mode has it)."""
        if previous is not None:
            self.view, self.method = previous.view, previous.method
            self._own_view_if_missing()

    # -- progress -------------------------------------------------------------------------------------
    @property
    def total_blocks(self) -> int:
        return -(-self.total_tokens // self.config.block_size)

    @property
    def shown_block(self) -> int:
        last = max(self.blocks_done - 1, 0)
        return last if self.block is None else min(max(self.block, 0), last)

    def status(self) -> str:
        cfg = self.config
        geometry = ", ".join(cfg.geometry())
        mode = cfg.mode + (f" vs {self.compare_mode}" if self.compare_mode else "")
        tokens = f"{self.tokens_done:,} / {self.total_tokens:,} tokens"
        if self.document_cut:
            tokens += f" ({self.document_cut}: document cut at max tokens)"
        parts = [f"{self.blocks_done} / {self.total_blocks} blocks", tokens]
        if self.state != "replayed":
            speed = self.tokens_done / self.elapsed if self.elapsed > 0 else 0.0
            parts += [f"{speed:,.0f} tokens/s", f"{self.elapsed:.1f} s elapsed"]
        nll = self.mean_nll()
        if self.state in ("done", "replayed", "stopped") and np.isfinite(nll):
            parts.append(f"mean NLL {nll:.3f} nats")
        head = {
            "streaming": "Streaming",
            "done": "Done",
            "stopped": "Stopped",
            "failed": "Failed",
            "replayed": "Replayed from trace",
        }[self.state]
        line = f"**{head}** · {self.model_label} · {self.document} · {mode} ({geometry}) · " + " · ".join(parts)
        for note in self.notes:
            line += f"\n\n**Note:** {note}"
        if self.error:
            line += f"\n\n**Error:** {self.error}"
        return line

    def mean_nll(self) -> float:
        if self.trace is None or "tokens.nll" not in self.trace.keys:
            return float("nan")
        nll = self.trace.array("tokens.nll")
        finite = nll[np.isfinite(nll)]
        return float(finite.mean()) if finite.size else float("nan")

    # -- recording ---------------------------------------------------------------------------------------
    def record_block(self) -> None:
        """After a block: trajectory features from the FAM states the trace recorded, so live runs and
        replays draw the same trajectories from the same data (no model state is read here)."""
        if self.features is None or self.trace is None or "fam.state" not in self.trace.keys:
            return
        states = self.trace.latest("fam.state")  # (recorded layers, fam_len or 1, hidden)
        for index, layer in enumerate(self.trace.layers_of("fam.state")):
            if layer in self.features.layers:
                self.features.add(layer, states[index])

    def record_compare(self, block_nll: np.ndarray) -> None:
        values = np.asarray(block_nll, dtype=np.float64)
        finite = values[np.isfinite(values)]
        self.compare_nll.append(float(finite.mean()) if finite.size else float("nan"))
        if self.trace is not None:  # travels with the trace file, so a replay shows the comparison
            self.trace.record_comparison(self.compare_mode, self.compare_nll)

    # -- figures -------------------------------------------------------------------------------------------
    def has_blocks(self) -> bool:
        return self.trace is not None and self.trace.n_blocks > 0

    def heatmap(self) -> go.Figure:
        if not self.has_blocks():
            return figures.empty_figure("no blocks yet")
        if missing := figures.missing_view(self.config, self.view):
            return figures.empty_figure(missing, figures.SHARE_VIEWS[self.view].title)
        return figures.view_figure(self.trace, self.view, selected_block=self.shown_block)

    def heads(self) -> go.Figure:
        if not self.has_blocks():
            return figures.empty_figure("no blocks yet")
        if missing := figures.missing_view(self.config, self.view):
            title = f"Block {self.shown_block}: {figures.SHARE_VIEWS[self.view].label} per head"
            return figures.empty_figure(missing, title)
        if self.token is not None:
            text = _token_texts(self.trace, self.token, self.token + 1)[0] if self.token < self.trace.n_tokens else None
            return figures.token_view_figure(self.trace, self.view, self.token, self.layer, text)
        return figures.head_view_figure(self.trace, self.view, self.shown_block, selected_layer=self.layer)

    def loss(self) -> go.Figure:
        if not self.has_blocks() or "tokens.nll" not in self.trace.keys:
            return figures.empty_figure("no blocks yet")
        means = figures.block_means(self.trace.array("tokens.nll"), self.trace.block_starts)
        if self.compare_mode and self.compare_nll:
            n = min(len(means), len(self.compare_nll))
            return figures.nll_compare(
                means[:n],
                np.asarray(self.compare_nll[:n]),
                self.config.mode,
                self.compare_mode,
                block_starts=self.trace.block_starts,
            )
        return figures.nll_compare(means, None, block_starts=self.trace.block_starts)

    def slots(self) -> go.Figure:
        """The per-slot views at the selected layer (else the top recorded one)."""
        if not self.has_blocks():
            return figures.empty_figure("no blocks yet", figures.SLOT_TITLE)
        return figures.slot_figure(self.trace, self.layer)

    def lens(self) -> go.Figure:
        """The memory lens at the selected layer (else the top recorded one), up to the shown block."""
        if not self.has_blocks():
            return figures.empty_figure("no blocks yet", figures.LENS_TITLE)
        return figures.lens_figure(self.trace, self.layer, self.shown_block)

    def dynamics(self) -> go.Figure:
        if not self.has_blocks():
            return figures.empty_figure("no blocks yet")
        return figures.fam_figure(self.trace)

    def trajectory(self) -> go.Figure:
        title = "FAM state trajectory"
        if self.features is None or not self.features.layers:
            return figures.empty_figure("FAM trajectories exist only in fam mode", title)
        n = self.features.n_blocks
        if n == 0:
            return figures.empty_figure("no blocks yet", title)
        if self.method == "UMAP":
            with self._lock:
                result = self.umap_result
            self.request_umap()
            if result is not None:
                covered, coords = result
                note = "" if covered == n else f"UMAP of blocks 0–{covered - 1}; updating off the UI thread…"
                return figures.fam_trajectory(coords, method="UMAP", note=note)
            return figures.fam_trajectory(
                self._pca(), method="PCA", note="UMAP is computing off the UI thread; PCA meanwhile"
            )
        return figures.fam_trajectory(self._pca(), method="PCA", note="each layer scaled to ±1")

    def _pca(self) -> dict[int, np.ndarray]:
        return {layer: scaled(pca_2d(self.features.array(layer))) for layer in self.features.layers}

    def request_umap(self) -> None:
        """Start a UMAP fit of the current trajectories in the background (one at a time per run)."""
        if self.features is None or not self.features.layers:
            return
        with self._lock:
            n = self.features.n_blocks
            busy = self.umap_future is not None and not self.umap_future.done()
            fresh = self.umap_result is not None and self.umap_result[0] == n
            if busy or fresh or n == 0:
                return
            snapshot = {layer: self.features.array(layer)[:n] for layer in self.features.layers}
            self.umap_future = _UMAP_WORKER.submit(self._fit_umap, n, snapshot)

    def _fit_umap(self, n: int, snapshot: dict[int, np.ndarray]) -> None:
        coords = {layer: scaled(umap_2d(values)) for layer, values in snapshot.items()}
        with self._lock:
            if self.umap_result is None or self.umap_result[0] < n:
                self.umap_result = (n, coords)

    def umap_pending(self) -> bool:
        with self._lock:
            return self.method == "UMAP" and self.umap_future is not None and not self.umap_future.done()

    def document_html(self, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        shading = None
        if self.attribution is not None:
            target, scores = self.attribution
            values = np.full(self.trace.n_tokens, np.nan, np.float32)
            values[: len(scores)] = np.abs(scores)
            shading = (values, f"|attribution| of token {target:,}'s prediction, through the memory")
        return document_html(self.trace, self.shown_block, self.layer, tokenizer, self.slot, self.content_only, shading)

    @property
    def model_label(self) -> str:
        """The model and adapter that produced the run, as recorded in its trace."""
        meta = self.trace.meta if self.trace is not None else {}
        return describe_model(meta.get("model"), meta.get("adapter"), adapter_known="adapter" in meta)

    def caption(self, with_compare: bool = True) -> str:
        """One line describing the run, for figure captions and file metadata; ``with_compare`` False for a
        figure that shows the run's own mode only (a compared mode appears in the loss plot alone)."""
        cfg = self.config
        meta = self.trace.meta if self.trace is not None else {}
        parts = [
            self.model_label,
            f"mode {cfg.mode}" + (f" vs {self.compare_mode}" if self.compare_mode and with_compare else ""),
            *cfg.geometry(),
        ]
        parts += [meta.get("dtype", ""), f"{self.tokens_done:,} tokens of {self.document}"]
        return " · ".join(p for p in parts if p)

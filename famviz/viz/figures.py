"""Plotly figures of a famviz trace: pure functions of numpy arrays, no model needed.

Every figure has axis titles and, for heatmaps, a labelled colour bar. Shares are always drawn on a
fixed 0..1 colour scale so that figures of different blocks, runs and modes compare by eye.

    >>> from famviz import figures
    >>> figures.share_heatmap(trace.array("block.share"), "fam")          # layer × block
    >>> figures.view_figure(trace, "block-fam")                            # the same, by view name
    >>> figures.nll_per_block(trace.array("tokens.nll"), trace.block_starts)
    >>> figures.fam_dynamics(trace.array("fam.norm"), trace.array("fam.update"))
    >>> figures.head_share_heatmap(trace.array("block.share")[7], "fam")   # one block: layer × head
    >>> figures.fam_trajectory({12: coords}, method="PCA")                 # 2-D path of a layer's FAM
    >>> figures.nll_compare(fam_means, bswa_means, "fam", "bswa")          # two modes + memory benefit

Long documents stay light: block axes show at most ``MAX_BLOCK_COLUMNS`` columns, the most recent
``RECENT_BLOCKS`` one per block and older ones averaged in bins (``block_bins``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from itertools import pairwise

import numpy as np
import plotly.graph_objects as go

from famviz.core.config import FamConfig
from famviz.core.modes import BLOCK_GROUPS, FAM_GROUPS, mode_names
from famviz.core.trace import Trace

SHARE_COLORSCALE = "Viridis"
# Figures skip plotly's validation (``_figure``), which would expand a Python-side scale name: plotly.js knows
# Viridis, Cividis and YlGnBu itself, Magma only as stops.
MAGMA = [
    [i / 9, color]
    for i, color in enumerate(
        ("#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf")
    )
]
MAX_BLOCK_COLUMNS = 240  # most block columns any figure draws
RECENT_BLOCKS = 120  # the latest blocks always get one column each
FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=12)


@dataclass(frozen=True)
class ShareView:
    """One way to look at attention shares: which channel kind and which of its query groups."""

    key: str  # trace channel kind: "block.share" or "fam.share"
    group: str  # one of that kind's groups
    label: str  # what a dropdown shows
    title: str  # the figure's title

    @property
    def groups(self) -> tuple[str, ...]:
        return BLOCK_GROUPS if self.key == "block.share" else FAM_GROUPS


SHARE_VIEWS: dict[str, ShareView] = {
    "block-fam": ShareView(
        "block.share", "fam", "Block queries → FAM", "Share of attention that block queries give to the FAM"
    ),
    "block-memory": ShareView(
        "block.share",
        "memory",
        "Block queries → memory blocks",
        "Share of attention that block queries give to memory blocks",
    ),
    "block-block": ShareView(
        "block.share",
        "block",
        "Block queries → own block",
        "Share of attention that block queries give to their own block",
    ),
    "block-sink": ShareView(
        "block.share",
        "sink",
        "Block queries → sink tokens",
        "Share of attention that block queries give to the kept first tokens (sink mode)",
    ),
    "fam-block": ShareView(
        "fam.share", "block", "FAM queries → block", "Share of attention that FAM queries give to the current block"
    ),
}


def default_view(config: FamConfig) -> str:
    """The share view that shows what a run's mode attends to besides its own block."""
    if config.active_fam_len:
        return "block-fam"
    if config.active_sink_tokens:
        return "block-sink"
    return "block-memory" if config.has_memory else "block-block"


def missing_view(config: FamConfig, view: str) -> str | None:
    """Why ``view`` is empty for every block of a run of ``config`` (its mode has no such keys), else None:
    a plot of zeros would read as "no attention there" rather than "nothing there"."""
    spec = SHARE_VIEWS[view]
    if spec.key == "fam.share" or spec.group == "fam":
        has = config.active_fam_len
        lacks = (
            "this run has no FAM (FAM length 0)"
            if config.spec.fam
            else f"{config.mode} mode has no FAM (only {_modes_with('fam')} mode has one)"
        )
    elif spec.group == "sink":
        has = config.active_sink_tokens
        lacks = (
            "this run keeps no sink tokens (sink tokens 0)"
            if config.spec.sinks
            else f"{config.mode} mode keeps no sink tokens (only {_modes_with('sinks')} mode does)"
        )
    elif spec.group == "memory":
        has, lacks = config.has_memory, "this run has no memory blocks (memory blocks 0)"
    else:  # every mode attends to its own block
        return None
    return None if has else f"{lacks}: pick “{SHARE_VIEWS[default_view(config)].label}”"


def _modes_with(flag: str) -> str:
    return " or ".join(mode_names(flag))


AXIS = dict(gridcolor="#e6e6e6", zeroline=False, linecolor="#999", ticks="outside")


def _axis(title: str | None = None, **kwargs) -> dict:
    return dict(AXIS, title=dict(text=title), **kwargs) if title else dict(AXIS, **kwargs)


def _block_ticks(n_blocks: int) -> dict:
    """Whole-number ticks on a block (or layer) axis (plotly would label a short axis 0, 0.5, 1...)."""
    return dict(tick0=0, dtick=1) if n_blocks <= 12 else dict(tickformat="d")


def _layer_axis(layers: np.ndarray | Sequence[int]) -> dict:
    """A layer axis: a tick on every row when there are few (they may skip layers), whole numbers always."""
    layers = [int(v) for v in layers]
    return dict(showgrid=False, tickvals=layers) if len(layers) <= 12 else dict(showgrid=False, tickformat="d")


def _layout(title: str, **kwargs) -> dict:
    """A figure's whole layout as one dict. Figures are built in one go, with plain styling rather than
    a named template: plotly validates every later ``update_*`` call and a template on its own costs
    ~12 ms per figure, which adds up when three figures are redrawn after every block."""
    layout = dict(
        title=dict(text=title, x=0.01, xanchor="left"),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        margin=dict(l=60, r=20, t=50, b=50),
    )
    layout.update(kwargs)
    return layout


def _figure(data: dict | Sequence[dict], layout: dict) -> go.Figure:
    """A figure from plain trace and layout dicts, without plotly's per-property validation: it costs
    ~10x the building itself, and these figures are rebuilt after every block (their shapes are
    checked by the tests instead)."""
    return go.Figure(data=[data] if isinstance(data, dict) else list(data), layout=layout, _validate=False)


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying one centred message (no data yet, or not available in this mode)."""
    note = dict(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14, color="#666")
    )
    return _figure([], _layout(title, annotations=[note], xaxis=dict(visible=False), yaxis=dict(visible=False)))


def _block_axis(n_blocks: int, block_starts: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Block indices for the x axis, and each block's first token (for hover text) when known."""
    x = np.arange(n_blocks)
    starts = None if block_starts is None else np.asarray(block_starts, dtype=np.int64)[:n_blocks]
    return x, starts


# -- long block axes ------------------------------------------------------------------------------
def block_bins(n_blocks: int, max_columns: int = MAX_BLOCK_COLUMNS, recent: int = RECENT_BLOCKS) -> np.ndarray:
    """Column edges over ``n_blocks`` blocks: (columns + 1,) increasing block indices.

    Up to ``max_columns`` blocks get one column each. Beyond that the latest ``recent`` blocks keep
    one column each and the older history is split into ``max_columns - recent`` equal bins, so a
    figure's size stays bounded however long the document is.
    """
    if n_blocks <= max_columns:
        return np.arange(n_blocks + 1)
    recent = min(recent, max_columns - 1)
    history = n_blocks - recent
    old_edges = np.unique(np.linspace(0, history, max_columns - recent + 1).round().astype(np.int64))
    return np.concatenate([old_edges, np.arange(history + 1, n_blocks + 1)])


def bin_blocks(values: np.ndarray, edges: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean of ``values`` over each block bin along ``axis`` (NaN-aware: NaN only when all are NaN)."""
    values = np.asarray(values, dtype=np.float32)
    if len(edges) - 1 == values.shape[axis]:
        return values
    moved = np.moveaxis(values, axis, 0)
    with np.errstate(invalid="ignore"), _nan_warnings_off():
        out = np.stack([np.nanmean(moved[a:b], axis=0) for a, b in pairwise(edges)])
    return np.moveaxis(out, 0, axis)


class _nan_warnings_off:
    """np.nanmean warns on all-NaN slices, which are expected here (e.g. a block with no NLL)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _block_columns(n_blocks: int, block_starts: Sequence[int] | None, max_columns: int):
    """(edges, x, hover label per column) for a block axis of ``n_blocks`` blocks."""
    edges = block_bins(n_blocks, max_columns)
    first, last = edges[:-1], edges[1:] - 1
    x = (first + last) / 2.0 if len(edges) - 1 < n_blocks else first.astype(np.float64)
    starts = None if block_starts is None else np.asarray(block_starts, dtype=np.int64)[:n_blocks]
    labels = []
    for a, b in zip(first, last, strict=True):
        label = f"block {a}" if a == b else f"blocks {a}–{b} (mean)"
        if starts is not None and len(starts) > a:
            label += f" · tokens from {starts[a]:,}"
        labels.append(label)
    return edges, x, np.asarray(labels, dtype=object)


def _column_hover(n_blocks: int, n_columns: int) -> str:
    """Hover text of a heatmap column: per-cell labels would cost ~35 bytes a cell on every update."""
    return "block %{x}" if n_columns == n_blocks else "blocks around %{x:.0f} (bin mean)"


# -- attention shares --------------------------------------------------------------------------------
def head_mean_share(share: np.ndarray, group: str, groups: Sequence[str] = BLOCK_GROUPS) -> np.ndarray:
    """(blocks, layers, heads, groups) shares -> (layers, blocks): one group, mean over heads."""
    share = np.asarray(share, dtype=np.float32)
    if share.ndim != 4 or share.shape[-1] != len(groups):
        raise ValueError(f"expected shares of shape (blocks, layers, heads, {len(groups)}), got {share.shape}")
    if group not in groups:
        raise ValueError(f"group must be one of {', '.join(groups)}, got {group!r}")
    return share[..., list(groups).index(group)].mean(axis=2).T


def share_heatmap(
    share: np.ndarray,
    group: str,
    *,
    groups: Sequence[str] = BLOCK_GROUPS,
    layers: Sequence[int] | None = None,
    block_starts: Sequence[int] | None = None,
    title: str | None = None,
    selected_block: int | None = None,
    max_columns: int = MAX_BLOCK_COLUMNS,
) -> go.Figure:
    """Layer × block heatmap of the attention share on ``group``, mean over heads, colours 0..1.

    ``share``: (blocks, layers, heads, len(groups)), e.g. ``trace.array("block.share")`` with
    groups (fam, memory, block, sink) or ``trace.array("fam.share")`` with groups (fam, block).
    ``layers``: the model layer index of each row (default 0..layers-1). ``selected_block`` draws a
    frame around that block's column (the drill-down's block).
    """
    z = head_mean_share(share, group, groups)
    n_layers, n_blocks = z.shape
    edges, x, labels = _block_columns(n_blocks, block_starts, max_columns)
    z = bin_blocks(z, edges, axis=1)
    y = np.arange(n_layers) if layers is None else np.asarray(layers)
    heatmap = dict(
        type="heatmap",
        z=z,
        x=x,
        y=y,
        zmin=0.0,
        zmax=1.0,
        colorscale=SHARE_COLORSCALE,
        colorbar=dict(title=dict(text=f"share on<br>{group}", side="right")),
        hovertemplate=_column_hover(n_blocks, len(x)) + "<br>layer %{y}<br>share %{z:.3f}<extra></extra>",
    )
    shapes = []
    if selected_block is not None and 0 <= selected_block < n_blocks:
        column = int(np.searchsorted(edges, selected_block, side="right") - 1)
        half = 0.5 if len(edges) - 1 == n_blocks else max((edges[column + 1] - edges[column]) / 2.0, 0.5)
        shapes.append(
            dict(
                type="rect",
                xref="x",
                yref="paper",
                x0=x[column] - half,
                x1=x[column] + half,
                y0=0,
                y1=1,
                line=dict(color="#e4572e", width=2),
            )
        )
    return _figure(
        heatmap,
        _layout(
            title or f"Attention share on {group} (mean over heads)",
            shapes=shapes,
            xaxis=_axis("block", showgrid=False, **_block_ticks(n_blocks)),
            yaxis=_axis("layer", **_layer_axis(y)),
        ),
    )


def view_figure(trace: Trace, view: str, selected_block: int | None = None) -> go.Figure:
    """The share heatmap of one of ``SHARE_VIEWS`` for a trace, or a message when it has no such data."""
    spec = SHARE_VIEWS[view]
    if spec.key not in trace.keys:
        return empty_figure(
            "FAM queries exist only in fam mode" if spec.key == "fam.share" else f"{spec.key} was not recorded",
            spec.title,
        )
    if trace.n_blocks == 0:
        return empty_figure("no blocks yet", spec.title)
    return share_heatmap(
        trace.array(spec.key),
        spec.group,
        groups=spec.groups,
        layers=trace.layers_of(spec.key),
        block_starts=trace.block_starts,
        title=spec.title,
        selected_block=selected_block,
    )


def head_share_heatmap(
    block_share: np.ndarray,
    group: str,
    *,
    groups: Sequence[str] = BLOCK_GROUPS,
    layers: Sequence[int] | None = None,
    block: int | None = None,
    selected_layer: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Drill-down: layer × head heatmap of one block's attention share on ``group``, colours 0..1.

    ``block_share``: (layers, heads, len(groups)), e.g. ``trace.array("block.share")[b]``.
    ``selected_layer`` (a model layer index) is framed.
    """
    block_share = np.asarray(block_share, dtype=np.float32)
    if block_share.ndim != 3 or block_share.shape[-1] != len(groups):
        raise ValueError(
            f"expected one block's shares of shape (layers, heads, {len(groups)}), got {block_share.shape}"
        )
    if group not in groups:
        raise ValueError(f"group must be one of {', '.join(groups)}, got {group!r}")
    z = block_share[..., list(groups).index(group)]
    n_layers, n_heads = z.shape
    y = np.arange(n_layers) if layers is None else np.asarray(layers)
    heatmap = dict(
        type="heatmap",
        z=z,
        x=np.arange(n_heads),
        y=y,
        zmin=0.0,
        zmax=1.0,
        colorscale=SHARE_COLORSCALE,
        colorbar=dict(title=dict(text=f"share on<br>{group}", side="right")),
        hovertemplate="layer %{y}<br>head %{x}<br>share %{z:.3f}<extra></extra>",
    )
    shapes = []
    if selected_layer is not None and selected_layer in list(y):
        row = list(y).index(selected_layer)
        shapes.append(
            dict(
                type="rect",
                xref="paper",
                yref="y",
                x0=0,
                x1=1,
                y0=y[row] - 0.5,
                y1=y[row] + 0.5,
                line=dict(color="#e4572e", width=2),
            )
        )
    where = f"block {block}" if block is not None else "one block"
    return _figure(
        heatmap,
        _layout(
            title or f"{where}: share on {group} per head",
            shapes=shapes,
            xaxis=_axis("head", showgrid=False, tick0=0, dtick=1),
            yaxis=_axis("layer", **_layer_axis(y)),
        ),
    )


def head_view_figure(trace: Trace, view: str, block: int, selected_layer: int | None = None) -> go.Figure:
    """``head_share_heatmap`` of one block of a trace for one of ``SHARE_VIEWS``."""
    spec = SHARE_VIEWS[view]
    title = f"Block {block}: {spec.label} per head"
    if spec.key not in trace.keys:
        return empty_figure(
            "FAM queries exist only in fam mode" if spec.key == "fam.share" else f"{spec.key} was not recorded", title
        )
    if not 0 <= block < trace.n_blocks:
        return empty_figure("no such block yet", title)
    return head_share_heatmap(
        trace.array(spec.key)[block],
        spec.group,
        groups=spec.groups,
        layers=trace.layers_of(spec.key),
        block=block,
        selected_layer=selected_layer,
        title=title,
    )


def token_view_figure(
    trace: Trace, view: str, token: int, selected_layer: int | None = None, text: str | None = None
) -> go.Figure:
    """``head_share_heatmap`` of one token's own attention (``block.*.token_share``) for a block-query view of
    ``SHARE_VIEWS``: where that token, not its block on average, looks, per layer and head."""
    spec = SHARE_VIEWS[view]
    words = f" ({text!r})" if text is not None else ""
    title = f"Token {token:,}{words}: {spec.label} per head"
    if spec.key != "block.share":
        return empty_figure("the token drill-down shows block tokens' attention: pick a Block queries view", title)
    if "block.token_share" not in trace.keys:
        return empty_figure("this run did not record each token's attention (tick it before Start)", title)
    if not 0 <= token < trace.n_tokens:
        return empty_figure("no such token yet", title)
    own = trace.array("block.token_share")[..., token]  # (layers, heads, groups)
    return head_share_heatmap(
        own, spec.group, layers=trace.layers_of("block.token_share"), selected_layer=selected_layer, title=title
    )


# -- next-token loss ---------------------------------------------------------------------------------
def block_means(values: np.ndarray, block_starts: Sequence[int]) -> np.ndarray:
    """Mean of the finite per-token ``values`` within each block (NaN for a block with none)."""
    values = np.asarray(values, dtype=np.float64)
    bounds = list(block_starts) + [values.shape[-1]]
    means = np.full(len(block_starts), np.nan)
    for i in range(len(block_starts)):
        part = values[bounds[i] : bounds[i + 1]]
        part = part[np.isfinite(part)]
        if part.size:
            means[i] = part.mean()
    return means


def nll_per_block(
    nll: np.ndarray, block_starts: Sequence[int], *, title: str | None = None, max_columns: int = MAX_BLOCK_COLUMNS
) -> go.Figure:
    """Line of the mean next-token NLL (nats) per block; ``nll`` per token (NaN for the first)."""
    return nll_compare(
        block_means(nll, block_starts), None, title=title, block_starts=block_starts, max_columns=max_columns
    )


def _nll_line(x: np.ndarray, values: np.ndarray, labels: list, name: str, color: str) -> dict:
    """One run's per-block mean NLL as a line on the top axes."""
    return dict(
        type="scatter",
        x=x,
        y=values,
        mode="lines+markers",
        name=name,
        customdata=labels,
        hovertemplate="%{customdata}<br>%{fullData.name}: %{y:.3f} nats<extra></extra>",
        line=dict(color=color),
        marker=dict(size=4),
        xaxis="x",
        yaxis="y",
    )


def _benefit_bars(x: np.ndarray, benefit: np.ndarray, labels: list, name: str) -> dict:
    """The second run's NLL minus the first's per block, on the bottom axes (green: the first predicts better)."""
    return dict(
        type="bar",
        x=x,
        y=benefit,
        name=name,
        customdata=labels,
        marker=dict(color=np.where(benefit >= 0, "#2a9d8f", "#b5654d")),
        xaxis="x2",
        yaxis="y2",
        hovertemplate="%{customdata}<br>memory benefit %{y:+.3f} nats<extra></extra>",
        showlegend=False,
    )


def nll_compare(
    primary: np.ndarray,
    other: np.ndarray | None,
    primary_label: str = "mean NLL",
    other_label: str = "",
    *,
    block_starts: Sequence[int] | None = None,
    title: str | None = None,
    max_columns: int = MAX_BLOCK_COLUMNS,
) -> go.Figure:
    """Per-block mean NLL of one run, or of two runs side by side plus their difference.

    ``primary``/``other``: per-block mean NLL (nats). With ``other`` a second panel shows
    ``other - primary``: the memory benefit of the primary mode (positive: it predicts better).
    """
    primary = np.asarray(primary, dtype=np.float64)
    n = len(primary)
    edges, x, labels = _block_columns(n, block_starts, max_columns)
    y = bin_blocks(primary, edges)
    colors = ("#3b6fb6", "#e4572e")

    def line(values: np.ndarray, name: str, color: str) -> dict:
        return _nll_line(x, values, labels, name, color)

    lines = [line(y, primary_label, colors[0])]
    xrange = [-0.5, max(n, 1) - 0.5]
    if other is None:
        return _figure(
            lines,
            _layout(
                title or "Next-token loss per block",
                showlegend=False,
                xaxis=_axis("block", range=xrange, **_block_ticks(n)),
                yaxis=_axis("mean next-token NLL (nats)", rangemode="tozero"),
            ),
        )
    other = np.asarray(other, dtype=np.float64)
    if other.shape != primary.shape:
        raise ValueError(f"the two runs differ in blocks: {primary.shape} and {other.shape}")
    y_other = bin_blocks(other, edges)
    lines.append(line(y_other, other_label, colors[1]))
    lines.append(_benefit_bars(x, y_other - y, labels, f"{other_label} − {primary_label}"))
    top, bottom = (0.42, 1.0), (0.0, 0.3)
    return _figure(
        lines,
        _layout(
            title or f"Next-token loss per block: {primary_label} vs {other_label}",
            legend=dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom"),
            xaxis=_axis(None, anchor="y", range=xrange, matches="x2", showticklabels=False),
            yaxis=_axis("NLL (nats)", domain=list(top), rangemode="tozero"),
            xaxis2=_axis("block", anchor="y2", range=xrange, **_block_ticks(n)),
            yaxis2=_axis(
                f"benefit of {primary_label}<br>({other_label} − {primary_label})",
                domain=list(bottom),
                zeroline=True,
                zerolinecolor="#999",
            ),
        ),
    )


# -- FAM dynamics --------------------------------------------------------------------------------------
def fam_dynamics(
    norm: np.ndarray,
    update: np.ndarray,
    *,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    max_columns: int = MAX_BLOCK_COLUMNS,
) -> go.Figure:
    """Two layer × block heatmaps: the FAM state's mean slot norm, and how much it changed.

    ``norm``, ``update``: (blocks, layers), i.e. ``trace.array("fam.norm")`` and ``trace.array("fam.update")``
    (update = 1 - cosine between the flattened state and the previous block's).
    """
    norm, update = np.asarray(norm, dtype=np.float32), np.asarray(update, dtype=np.float32)
    if norm.ndim != 2 or norm.shape != update.shape:
        raise ValueError(
            f"expected norm and update of the same shape (blocks, layers), got {norm.shape} and {update.shape}"
        )
    n_blocks, n_layers = norm.shape
    edges, x, labels = _block_columns(n_blocks, None, max_columns)
    norm, update = bin_blocks(norm, edges), bin_blocks(update, edges)
    y = np.arange(n_layers) if layers is None else np.asarray(layers)
    hover = _column_hover(n_blocks, len(x))
    # Two rows sharing the block axis, laid out by hand (make_subplots is slow to build).
    top, bottom, gap = (0.56, 1.0), (0.0, 0.44), 0.02
    norm_map = dict(
        type="heatmap",
        z=norm.T,
        x=x,
        y=y,
        colorscale="Cividis",
        zmin=0.0,
        xaxis="x",
        yaxis="y",
        colorbar=dict(title=dict(text="norm", side="right"), y=sum(top) / 2, len=top[1] - top[0]),
        hovertemplate=hover + "<br>layer %{y}<br>norm %{z:.2f}<extra></extra>",
    )
    update_map = dict(
        type="heatmap",
        z=update.T,
        x=x,
        y=y,
        colorscale=MAGMA,
        zmin=0.0,
        xaxis="x2",
        yaxis="y2",
        colorbar=dict(title=dict(text="update", side="right"), y=sum(bottom) / 2, len=bottom[1] - bottom[0]),
        hovertemplate=hover + "<br>layer %{y}<br>update %{z:.4f}<extra></extra>",
    )
    subtitles = [
        dict(
            text=text,
            x=0.5,
            y=domain[1] + gap,
            xref="paper",
            yref="paper",
            xanchor="center",
            yanchor="bottom",
            showarrow=False,
            font=dict(size=12),
        )
        for text, domain in (
            ("FAM norm (mean slot L2 norm)", top),
            ("FAM update (1 − cosine to previous block)", bottom),
        )
    ]
    layout = _layout(
        title or "FAM dynamics per layer",
        annotations=subtitles,
        margin=dict(l=60, r=20, t=70, b=50),
        xaxis=_axis(None, anchor="y", showgrid=False, showticklabels=False, matches="x2"),
        yaxis=_axis("layer", domain=list(top), **_layer_axis(y)),
        xaxis2=_axis("block", anchor="y2", showgrid=False, **_block_ticks(n_blocks)),
        yaxis2=_axis("layer", domain=list(bottom), **_layer_axis(y)),
    )
    return _figure([norm_map, update_map], layout)


def fam_figure(trace: Trace) -> go.Figure:
    """``fam_dynamics`` of a trace, or a message when the trace has no FAM (bswa/full mode)."""
    if "fam.norm" not in trace.keys or "fam.update" not in trace.keys:
        return empty_figure("FAM dynamics exist only in fam mode", "FAM dynamics per layer")
    if trace.n_blocks == 0:
        return empty_figure("no blocks yet", "FAM dynamics per layer")
    layers = trace.layers_of("fam.norm")
    if layers != trace.layers_of("fam.update"):
        raise ValueError("fam.norm and fam.update were recorded at different layers")
    return fam_dynamics(trace.array("fam.norm"), trace.array("fam.update"), layers=layers)


# -- FAM state trajectory -------------------------------------------------------------------------------
TRAJECTORY_COLORS = ("#3b6fb6", "#e4572e", "#2a9d8f", "#8d5fd3", "#c9a227", "#555555")
MAX_TRAJECTORY_POINTS = 400  # per layer; older points are thinned out beyond that


def _thin(n: int, max_points: int, recent: int) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` points: all of the latest ``recent``, history evenly."""
    if n <= max_points:
        return np.arange(n)
    history = np.unique(np.linspace(0, n - recent - 1, max_points - recent).round().astype(np.int64))
    return np.concatenate([history, np.arange(n - recent, n)])


def fam_trajectory(
    coords: dict[int, np.ndarray],
    *,
    method: str = "PCA",
    blocks: Sequence[int] | None = None,
    title: str | None = None,
    note: str = "",
    max_points: int = MAX_TRAJECTORY_POINTS,
) -> go.Figure:
    """2-D path of each layer's FAM state across blocks; markers coloured by block, last one ringed.

    ``coords``: layer -> (blocks, 2) projected states (each layer projected on its own axes, so
    the panels share no scale); ``blocks``: the block index of each row (default 0..n-1).
    """
    if not coords:
        raise ValueError("no layers to draw")
    traces = []
    n_max = 0
    for i, (layer, points) in enumerate(coords.items()):
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"layer {layer}: expected (blocks, 2) coordinates, got {points.shape}")
        n = len(points)
        n_max = max(n_max, n)
        index = np.arange(n) if blocks is None else np.asarray(blocks)[:n]
        keep = _thin(n, max_points, min(RECENT_BLOCKS, max_points // 2))
        color = TRAJECTORY_COLORS[i % len(TRAJECTORY_COLORS)]
        traces.append(
            dict(
                type="scatter",
                x=points[keep, 0],
                y=points[keep, 1],
                mode="lines+markers",
                name=f"layer {layer}",
                customdata=index[keep],
                line=dict(color=color, width=1),
                marker=dict(
                    size=6,
                    color=index[keep],
                    colorscale="Greys",
                    cmin=0,
                    cmax=max(n - 1, 1),
                    line=dict(color=color, width=1.5),
                    showscale=False,
                ),
                hovertemplate=f"layer {layer}<br>block %{{customdata}}<br>"
                f"({method} %{{x:.2f}}, %{{y:.2f}})<extra></extra>",
            )
        )
        if n:
            traces.append(
                dict(
                    type="scatter",
                    x=points[-1:, 0],
                    y=points[-1:, 1],
                    mode="markers",
                    showlegend=False,
                    marker=dict(size=13, color="rgba(0,0,0,0)", line=dict(color=color, width=2.5)),
                    hoverinfo="skip",
                )
            )
    heading = title or f"FAM state trajectory ({method}, per layer)"
    if note:
        heading += f"<br><sup>{note}</sup>"
    return _figure(
        traces,
        _layout(
            heading,
            legend=dict(orientation="h", x=1.0, xanchor="right", y=1.0, yanchor="bottom"),
            # the key to the markers under the axis title (an annotation of its own collided with the title)
            xaxis=_axis(f"{method} 1<br><sup>dark = later block; ringed = latest</sup>"),
            yaxis=_axis(f"{method} 2"),
        ),
    )


# -- memory lens ------------------------------------------------------------------------------------------
TokenText = Callable[[int], str]  # a token id's text
MAX_LENS_BLOCKS = 48  # block columns of the lens heatmap (each cell carries its top tokens for hover)
LENS_TITLE = "Memory lens: what each FAM slot decodes to"


def lens_layer(trace: Trace, wanted: int | None) -> int | None:
    """The layer the lens view shows: ``wanted`` where the lens was recorded there, else the top recorded one
    (None: the trace has no lens)."""
    if "fam.lens" not in trace.keys or not trace.layers_of("fam.lens"):
        return None
    layers = trace.layers_of("fam.lens")
    return wanted if wanted in layers else layers[-1]


def lens_cell_text(ids: np.ndarray, probs: np.ndarray, token_text: TokenText) -> str:
    """One slot's top tokens as hover lines: ``'␣7' 0.31``, most probable first (whitespace made visible)."""
    lines = []
    for token_id, p in zip(ids.tolist(), probs.astype(np.float32).tolist(), strict=True):
        text = token_text(token_id).replace(" ", "␣").replace("\n", "⏎")
        lines.append(f"{escape(text)} {p:.2f}")
    return "<br>".join(lines)


def memory_lens_heatmap(
    ids: np.ndarray,
    probs: np.ndarray,
    token_text: TokenText,
    *,
    layer: int,
    block_starts: Sequence[int] | None = None,
    selected_block: int | None = None,
    max_blocks: int = MAX_LENS_BLOCKS,
    title: str | None = None,
) -> go.Figure:
    """Slot × block heatmap of one layer's memory lens: colour = the top token's probability, hover = the
    slot's top-k tokens after that block; the ``max_blocks`` blocks up to ``selected_block`` (default: the
    last), each its own column.

    ``ids``, ``probs``: (blocks, fam_len, k), e.g. ``trace["fam.29.lens"]`` and ``trace["fam.29.lens_p"]``;
    ``token_text``: token id -> its text (``Trace.token_text``).
    """
    n_blocks, n_slots, _ = ids.shape
    last = n_blocks - 1 if selected_block is None else min(max(selected_block, 0), n_blocks - 1)
    first = max(0, last - max_blocks + 1)
    blocks = np.arange(first, last + 1)
    z = probs[first : last + 1, :, 0].astype(np.float32).T  # (slots, blocks)
    text = [[lens_cell_text(ids[b, slot], probs[b, slot], token_text) for b in blocks] for slot in range(n_slots)]
    starts = None if block_starts is None else np.asarray(block_starts)[blocks]
    hover = "block %{x}" + (" · tokens from %{customdata:,}" if starts is not None else "")
    heatmap = dict(
        type="heatmap",
        z=z,
        x=blocks,
        y=np.arange(n_slots),
        zmin=0.0,
        zmax=1.0,
        colorscale="YlGnBu",  # a plotly.js name (figures skip validation, which would expand other names)
        reversescale=True,  # light: a diffuse slot; dark blue: one token dominates
        text=text,
        customdata=None if starts is None else np.broadcast_to(starts, z.shape),
        colorbar=dict(title=dict(text="top token's<br>probability", side="right")),
        hovertemplate=hover + "<br>slot %{y}<br>%{text}<extra></extra>",
    )
    shown = f"blocks {first}–{last}" if first < last else f"block {last}"
    return _figure(
        heatmap,
        _layout(
            title or f"{LENS_TITLE} (layer {layer}, {shown})",
            xaxis=_axis("block", showgrid=False, **_block_ticks(len(blocks))),
            yaxis=_axis("FAM slot", showgrid=False, autorange="reversed"),
        ),
    )


def held_tokens(
    ids: np.ndarray, probs: np.ndarray, token_text: TokenText, top: int = 8
) -> list[tuple[str, int, float]]:
    """The tokens one block's lens holds most: (text, slots where it is the top token, its largest
    probability), most slots first. ``ids``, ``probs``: (fam_len, k) of one block and layer."""
    first, p = ids[:, 0].tolist(), probs[:, 0].astype(np.float32).tolist()
    counts: dict[int, list] = {}
    for token_id, prob in zip(first, p, strict=True):
        entry = counts.setdefault(token_id, [0, 0.0])
        entry[0] += 1
        entry[1] = max(entry[1], prob)
    ranked = sorted(counts.items(), key=lambda item: (-item[1][0], -item[1][1]))[:top]
    return [(token_text(token_id), n, prob) for token_id, (n, prob) in ranked]


def _unrecorded(trace: Trace, shown: int | None, what: str, option: str, title: str) -> go.Figure | None:
    """A message figure when an opt-in view has nothing to show (``shown`` None: not recorded), else None."""
    if shown is None:
        why = (
            f"only fam mode has {what}"
            if "fam.norm" not in trace.keys
            else f"this run did not record {what} (set the slot layers before Start, or {option})"
        )
        return empty_figure(why, title)
    return empty_figure("no blocks yet", title) if trace.n_blocks == 0 else None


def lens_figure(trace: Trace, layer: int | None = None, selected_block: int | None = None) -> go.Figure:
    """``memory_lens_heatmap`` of a trace at ``layer`` (see ``lens_layer``), or a message saying why there is none."""
    shown = lens_layer(trace, layer)
    if (missing := _unrecorded(trace, shown, "the memory lens", "`stream --lens`", LENS_TITLE)) is not None:
        return missing
    ids, probs = trace[f"fam.{shown}.lens"], trace[f"fam.{shown}.lens_p"]
    block = trace.n_blocks - 1 if selected_block is None else min(max(selected_block, 0), trace.n_blocks - 1)
    first = max(0, block - MAX_LENS_BLOCKS + 1)
    where = f"layer {shown}" + (f"; layer {layer} was not recorded" if layer is not None and layer != shown else "")
    held = held_tokens(ids[block], probs[block], trace.token_text)
    held_text = ", ".join(f"{escape(text).replace(' ', '␣')} ×{n}" for text, n, _ in held)
    title = (
        f"{LENS_TITLE} ({where}, blocks {first}–{block})"
        f"<br><sup>after block {block}, the slots' top tokens: {held_text}</sup>"
    )
    return memory_lens_heatmap(
        ids, probs, trace.token_text, layer=shown, block_starts=trace.block_starts, selected_block=block, title=title
    )


# -- per-slot views ------------------------------------------------------------------------------------------
SLOT_TITLE = "FAM slots"
SLOT_ROWS = (  # (channel kind, subtitle, colour scale, hover format)
    ("fam.slot_norm", "norm (L2) of each slot", "Cividis", ".2f"),
    ("fam.slot_update", "update (1 − cosine to the slot before the block)", MAGMA, ".4f"),
    ("fam.slot_received", "attention the block's queries give each slot", SHARE_COLORSCALE, ".4f"),
)


def slot_layer(trace: Trace, wanted: int | None) -> int | None:
    """The layer the per-slot view shows: ``wanted`` where every per-slot row was recorded, else the top such
    layer (None: none)."""
    keys = [key for key, *_ in SLOT_ROWS]
    if not all(key in trace.keys for key in keys):
        return None
    layers = sorted(set.intersection(*(set(trace.layers_of(key)) for key in keys)))
    if not layers:
        return None
    return wanted if wanted in layers else layers[-1]


def slot_heatmaps(
    rows: Sequence[np.ndarray],
    *,
    layer: int,
    block_starts: Sequence[int] | None = None,
    title: str | None = None,
    max_columns: int = MAX_BLOCK_COLUMNS,
) -> go.Figure:
    """Slot × block heatmaps of one layer, stacked on a shared block axis: each FAM slot's norm, its update and
    the attention the block's queries give it (``SLOT_ROWS``; each row (blocks, fam_len)), not averaged over
    slots as the dynamics view is."""
    n_blocks, n_slots = np.asarray(rows[0]).shape
    edges, x, _ = _block_columns(n_blocks, block_starts, max_columns)
    hover = _column_hover(n_blocks, len(x))
    height = 1.0 / len(rows)
    traces, annotations, axes = [], [], {}
    for i, ((_, subtitle, colorscale, fmt), values) in enumerate(zip(SLOT_ROWS, rows, strict=True)):
        domain = (1.0 - (i + 1) * height + 0.04, 1.0 - i * height - 0.04)
        suffix = "" if i == 0 else str(i + 1)
        traces.append(
            dict(
                type="heatmap",
                z=bin_blocks(np.asarray(values, dtype=np.float32), edges).T,
                x=x,
                y=np.arange(n_slots),
                colorscale=colorscale,
                zmin=0.0,
                xaxis=f"x{suffix}",
                yaxis=f"y{suffix}",
                colorbar=dict(y=sum(domain) / 2, len=domain[1] - domain[0], thickness=14),
                hovertemplate=hover + "<br>slot %{y}<br>%{z:" + fmt + "}<extra></extra>",
            )
        )
        annotations.append(
            dict(
                text=subtitle,
                x=0.5,
                y=domain[1],
                xref="paper",
                yref="paper",
                xanchor="center",
                yanchor="bottom",
                showarrow=False,
                font=dict(size=12),
            )
        )
        last = i == len(rows) - 1
        axes[f"xaxis{suffix}"] = _axis(
            "block" if last else None,
            anchor=f"y{suffix}",
            showgrid=False,
            showticklabels=last,
            **({} if last else {"matches": f"x{len(rows)}"}),
            **_block_ticks(n_blocks),
        )
        axes[f"yaxis{suffix}"] = _axis("slot", domain=list(domain), showgrid=False, autorange="reversed")
    layout = _layout(
        title or f"{SLOT_TITLE}: layer {layer}", annotations=annotations, margin=dict(l=60, r=20, t=70, b=50), **axes
    )
    return _figure(traces, layout)


def slot_figure(trace: Trace, layer: int | None = None) -> go.Figure:
    """``slot_heatmaps`` of a trace at ``layer`` (see ``slot_layer``), or a message saying why there are none."""
    shown = slot_layer(trace, layer)
    if (missing := _unrecorded(trace, shown, "the per-slot views", "`stream --slots`", SLOT_TITLE)) is not None:
        return missing
    where = f"layer {shown}" + (f"; layer {layer} was not recorded" if layer is not None and layer != shown else "")
    rows = [trace[key.replace("fam.", f"fam.{shown}.")] for key, *_ in SLOT_ROWS]
    return slot_heatmaps(rows, layer=shown, block_starts=trace.block_starts, title=f"{SLOT_TITLE} ({where})")

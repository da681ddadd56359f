"""Plotly figures of a famviz trace: pure functions of numpy arrays, no model needed.

Every figure has axis titles and, for heatmaps, a labelled colour bar. Shares are always drawn on a
fixed 0..1 colour scale so that figures of different blocks, runs and modes compare by eye.

    >>> from famviz import figures
    >>> figures.share_heatmap(trace.array("block.share"), "fam")          # layer × block
    >>> figures.view_figure(trace, "block-fam")                            # the same, by view name
    >>> figures.nll_per_block(trace.array("tokens.nll"), trace.block_starts)
    >>> figures.fam_dynamics(trace.array("fam.norm"), trace.array("fam.update"))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from .trace import BLOCK_GROUPS, FAM_GROUPS, Trace

SHARE_COLORSCALE = "Viridis"
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
    "block-fam": ShareView("block.share", "fam", "Block queries → FAM",
                           "Share of attention that block queries give to the FAM"),
    "block-memory": ShareView("block.share", "memory", "Block queries → memory blocks",
                              "Share of attention that block queries give to memory blocks"),
    "block-block": ShareView("block.share", "block", "Block queries → own block",
                             "Share of attention that block queries give to their own block"),
    "fam-block": ShareView("fam.share", "block", "FAM queries → block",
                           "Share of attention that FAM queries give to the current block"),
}


AXIS = dict(gridcolor="#e6e6e6", zeroline=False, linecolor="#999", ticks="outside")


def _axis(title: str | None = None, **kwargs) -> dict:
    return dict(AXIS, title=dict(text=title), **kwargs) if title else dict(AXIS, **kwargs)


def _block_ticks(n_blocks: int) -> dict:
    """Whole-number ticks on a block axis (plotly would label a short axis 0, 0.5, 1...)."""
    return dict(tick0=0, dtick=1) if n_blocks <= 12 else dict(tickformat="d")


def _layout(title: str, **kwargs) -> dict:
    """A figure's whole layout as one dict. Figures are built in one go, with plain styling rather than
    a named template: plotly validates every later ``update_*`` call and a template on its own costs
    ~12 ms per figure, which adds up when three figures are redrawn after every block."""
    layout = dict(title=dict(text=title, x=0.01, xanchor="left"), font=FONT, plot_bgcolor="white",
                  paper_bgcolor="white", margin=dict(l=60, r=20, t=50, b=50))
    layout.update(kwargs)
    return layout


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying one centred message (no data yet, or not available in this mode)."""
    note = dict(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                font=dict(size=14, color="#666"))
    return go.Figure(layout=_layout(title, annotations=[note], xaxis=dict(visible=False),
                                    yaxis=dict(visible=False)))


def _block_axis(n_blocks: int, block_starts: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Block indices for the x axis, and each block's first token (for hover text) when known."""
    x = np.arange(n_blocks)
    starts = None if block_starts is None else np.asarray(block_starts, dtype=np.int64)[:n_blocks]
    return x, starts


# -- attention shares --------------------------------------------------------------------------------
def head_mean_share(share: np.ndarray, group: str, groups: Sequence[str] = BLOCK_GROUPS) -> np.ndarray:
    """(blocks, layers, heads, groups) shares -> (layers, blocks): one group, mean over heads."""
    share = np.asarray(share, dtype=np.float32)
    if share.ndim != 4 or share.shape[-1] != len(groups):
        raise ValueError(f"expected shares of shape (blocks, layers, heads, {len(groups)}), got {share.shape}")
    if group not in groups:
        raise ValueError(f"group must be one of {', '.join(groups)}, got {group!r}")
    return share[..., list(groups).index(group)].mean(axis=2).T


def share_heatmap(share: np.ndarray, group: str, *, groups: Sequence[str] = BLOCK_GROUPS,
                  layers: Sequence[int] | None = None, block_starts: Sequence[int] | None = None,
                  title: str | None = None) -> go.Figure:
    """Layer × block heatmap of the attention share on ``group``, mean over heads, colours 0..1.

    ``share``: (blocks, layers, heads, len(groups)), e.g. ``trace.array("block.share")`` with
    groups (fam, memory, block) or ``trace.array("fam.share")`` with groups (fam, block).
    ``layers``: the model layer index of each row (default 0..layers-1).
    """
    z = head_mean_share(share, group, groups)
    n_layers, n_blocks = z.shape
    x, starts = _block_axis(n_blocks, block_starts)
    y = np.arange(n_layers) if layers is None else np.asarray(layers)
    if starts is not None:
        custom = np.broadcast_to(starts[None, :], z.shape)
        hover = "block %{x} (tokens from %{customdata})<br>layer %{y}<br>share %{z:.3f}<extra></extra>"
    else:
        custom, hover = None, "block %{x}<br>layer %{y}<br>share %{z:.3f}<extra></extra>"
    heatmap = go.Heatmap(z=z, x=x, y=y, customdata=custom, zmin=0.0, zmax=1.0, colorscale=SHARE_COLORSCALE,
                         colorbar=dict(title=dict(text=f"share on<br>{group}", side="right")), hovertemplate=hover)
    return go.Figure(heatmap, layout=_layout(title or f"Attention share on {group} (mean over heads)",
                                             xaxis=_axis("block", showgrid=False, **_block_ticks(n_blocks)),
                                             yaxis=_axis("layer", showgrid=False)))


def view_figure(trace: Trace, view: str) -> go.Figure:
    """The share heatmap of one of ``SHARE_VIEWS`` for a trace, or a message when it has no such data."""
    spec = SHARE_VIEWS[view]
    if spec.key not in trace.keys:
        return empty_figure("FAM queries exist only in fam mode" if spec.key == "fam.share"
                            else f"{spec.key} was not recorded", spec.title)
    if trace.n_blocks == 0:
        return empty_figure("no blocks yet", spec.title)
    return share_heatmap(trace.array(spec.key), spec.group, groups=spec.groups, layers=trace.layers_of(spec.key),
                         block_starts=trace.block_starts, title=spec.title)


# -- next-token loss ---------------------------------------------------------------------------------
def block_means(values: np.ndarray, block_starts: Sequence[int]) -> np.ndarray:
    """Mean of the finite per-token ``values`` within each block (NaN for a block with none)."""
    values = np.asarray(values, dtype=np.float64)
    bounds = list(block_starts) + [values.shape[-1]]
    means = np.full(len(block_starts), np.nan)
    for i in range(len(block_starts)):
        part = values[bounds[i]:bounds[i + 1]]
        part = part[np.isfinite(part)]
        if part.size:
            means[i] = part.mean()
    return means


def nll_per_block(nll: np.ndarray, block_starts: Sequence[int], *, title: str | None = None) -> go.Figure:
    """Line of the mean next-token NLL (nats) per block; ``nll`` per token (NaN for the first)."""
    means = block_means(nll, block_starts)
    x, starts = _block_axis(len(means), block_starts)
    with np.errstate(over="ignore"):
        ppl = np.exp(means)
    line = go.Scatter(
        x=x, y=means, mode="lines+markers", name="mean NLL", customdata=np.stack([starts, ppl], axis=-1),
        hovertemplate="block %{x} (tokens from %{customdata[0]:.0f})<br>mean NLL %{y:.3f} nats"
                      "<br>perplexity %{customdata[1]:.1f}<extra></extra>",
        line=dict(color="#3b6fb6"), marker=dict(size=5),
    )
    return go.Figure(line, layout=_layout(
        title or "Next-token loss per block", showlegend=False,
        xaxis=_axis("block", range=[-0.5, max(len(means), 1) - 0.5], **_block_ticks(len(means))),
        yaxis=_axis("mean next-token NLL (nats)", rangemode="tozero")))


# -- FAM dynamics --------------------------------------------------------------------------------------
def fam_dynamics(norm: np.ndarray, update: np.ndarray, *, layers: Sequence[int] | None = None,
                 title: str | None = None) -> go.Figure:
    """Two layer × block heatmaps: the FAM state's mean slot norm, and how much it changed.

    ``norm``, ``update``: (blocks, layers), i.e. ``trace.array("fam.norm")`` and ``trace.array("fam.update")``
    (update = 1 - cosine between the flattened state and the previous block's).
    """
    norm, update = np.asarray(norm, dtype=np.float32), np.asarray(update, dtype=np.float32)
    if norm.ndim != 2 or norm.shape != update.shape:
        raise ValueError(f"expected norm and update of the same shape (blocks, layers), got {norm.shape} and {update.shape}")
    n_blocks, n_layers = norm.shape
    x = np.arange(n_blocks)
    y = np.arange(n_layers) if layers is None else np.asarray(layers)
    # Two rows sharing the block axis, laid out by hand (make_subplots is slow to build).
    top, bottom, gap = (0.56, 1.0), (0.0, 0.44), 0.02
    norm_map = go.Heatmap(
        z=norm.T, x=x, y=y, colorscale="Cividis", zmin=0.0, xaxis="x", yaxis="y",
        colorbar=dict(title=dict(text="norm", side="right"), y=sum(top) / 2, len=top[1] - top[0]),
        hovertemplate="block %{x}<br>layer %{y}<br>norm %{z:.2f}<extra></extra>",
    )
    update_map = go.Heatmap(
        z=update.T, x=x, y=y, colorscale="Magma", zmin=0.0, xaxis="x2", yaxis="y2",
        colorbar=dict(title=dict(text="update", side="right"), y=sum(bottom) / 2, len=bottom[1] - bottom[0]),
        hovertemplate="block %{x}<br>layer %{y}<br>update %{z:.4f}<extra></extra>",
    )
    subtitles = [dict(text=text, x=0.5, y=domain[1] + gap, xref="paper", yref="paper", xanchor="center",
                      yanchor="bottom", showarrow=False, font=dict(size=12))
                 for text, domain in (("FAM norm (mean slot L2 norm)", top),
                                      ("FAM update (1 − cosine to previous block)", bottom))]
    layout = _layout(
        title or "FAM dynamics per layer", annotations=subtitles, margin=dict(l=60, r=20, t=70, b=50),
        xaxis=_axis(None, anchor="y", showgrid=False, showticklabels=False, matches="x2"),
        yaxis=_axis("layer", domain=list(top), showgrid=False),
        xaxis2=_axis("block", anchor="y2", showgrid=False, **_block_ticks(n_blocks)),
        yaxis2=_axis("layer", domain=list(bottom), showgrid=False),
    )
    return go.Figure([norm_map, update_map], layout=layout)


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

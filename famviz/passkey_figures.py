"""PassKey figures: the length × depth accuracy heatmap (one panel per mode) and the retention curve.

Pure functions of plain results (``famviz.passkey`` cells and retention points), no model needed.
"""
from __future__ import annotations

import math

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import empty_figure
from .passkey import CellResult, RetentionPoint, accuracy_grid

ACCURACY_SCALE = [[0.0, "#b2182b"], [0.5, "#f7f7f7"], [1.0, "#2166ac"]]


def _length_label(length: int) -> str:
    return f"{length // 1000}k" if length % 1000 == 0 else str(length)


def passkey_heatmap(cells: Sequence[CellResult], title: str = "PassKey retrieval accuracy") -> go.Figure:
    """Accuracy per (length, depth), one panel per mode; cells not run yet stay blank."""
    grids = accuracy_grid(cells)
    if not grids:
        return empty_figure("no PassKey results yet", title)
    labels = list(grids)
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for column, label in enumerate(labels, start=1):
        lengths, depths, grid = grids[label]
        trials = {(c.length, c.depth): c.trials for c in cells if c.label == label}
        text = [[("" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0%}") for j in range(len(depths))]
                for i in range(len(lengths))]
        hover = [[f"{label}<br>length {lengths[i]} tokens<br>depth {depths[j]:g}<br>"
                  f"trials {trials.get((lengths[i], depths[j]), 0)}<br>accuracy %{{z:.0%}}<extra></extra>"
                  for j in range(len(depths))] for i in range(len(lengths))]
        fig.add_trace(go.Heatmap(
            z=grid.T, x=[_length_label(n) for n in lengths], y=[f"{d:g}" for d in depths],
            text=np.array(text).T, texttemplate="%{text}", hovertemplate=np.array(hover).T,
            zmin=0.0, zmax=1.0, colorscale=ACCURACY_SCALE, showscale=column == len(labels),
            colorbar=dict(title=dict(text="accuracy"), tickformat=".0%")), row=1, col=column)
        fig.update_xaxes(title_text="length (tokens)", type="category", row=1, col=column)
    fig.update_yaxes(title_text="key depth", type="category", row=1, col=1)
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"), plot_bgcolor="white", paper_bgcolor="white",
                      margin=dict(l=60, r=20, t=70, b=50))
    return fig


def retention_figure(points: Sequence[RetentionPoint], key: int | None = None,
                     title: str = "Does the memory still hold the key?") -> go.Figure:
    """Key log-probability (line) and greedy retrieval success (markers) against blocks since the key."""
    if not points:
        return empty_figure("no probe yet: the key has not gone by", title)
    x = [p.blocks_since_key for p in points]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=[p.key_logprob for p in points], mode="lines+markers", name="log p(key)",
                             line=dict(color="#444"), hovertemplate="blocks since key %{x}<br>log p(key) %{y:.2f}"
                                                                    "<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(
        x=x, y=[1.0 if p.correct else 0.0 for p in points], mode="markers", name="retrieved",
        marker=dict(size=11, symbol=["circle" if p.correct else "x" for p in points],
                    color=["#2166ac" if p.correct else "#b2182b" for p in points]),
        customdata=[[p.predicted if p.predicted is not None else "none", p.tokens] for p in points],
        hovertemplate="blocks since key %{x}<br>answer %{customdata[0]}<br>tokens %{customdata[1]}<extra></extra>"),
        secondary_y=True)
    subtitle = f" (key {key})" if key is not None else ""
    fig.update_layout(title=dict(text=title + subtitle, x=0.01, xanchor="left"), plot_bgcolor="white",
                      paper_bgcolor="white", legend=dict(orientation="h", y=-0.2), margin=dict(l=60, r=60, t=50, b=60))
    # Whole blocks only: with "d" alone, plotly's fractional ticks of a short curve read "0 1 1 2 2".
    fig.update_xaxes(title_text="blocks since the key went by", tickformat="d", tick0=0,
                     dtick=max(1, math.ceil(max((p.blocks_since_key for p in points), default=1) / 10)))
    fig.update_yaxes(title_text="log p(key tokens)", secondary_y=False)
    fig.update_yaxes(title_text="retrieved", range=[-0.15, 1.15], tickvals=[0, 1], ticktext=["no", "yes"],
                     secondary_y=True)
    return fig

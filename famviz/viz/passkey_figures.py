"""PassKey figures: the length × depth accuracy heatmap (one panel per mode) and the retention curve.

Pure functions of plain results (``famviz.probes.passkey`` cells and retention points), no model needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from famviz.probes.passkey import CellResult, RetentionPoint, accuracy_grid, chance_key_logprob, keys_with_digits
from famviz.viz.figures import empty_figure

ACCURACY_SCALE = [[0.0, "#b2182b"], [0.5, "#f7f7f7"], [1.0, "#2166ac"]]


def _length_label(length: int) -> str:
    return f"{length // 1000}k" if length % 1000 == 0 else str(length)


def passkey_heatmap(cells: Sequence[CellResult], title: str = "PassKey retrieval accuracy") -> go.Figure:
    """Accuracy per (length, depth), one panel per mode; cells not run yet stay blank."""
    grids = accuracy_grid(cells)
    if not grids:
        return empty_figure("no PassKey results yet", title)
    labels = list(grids)
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, shared_yaxes=True, horizontal_spacing=0.04)
    for column, label in enumerate(labels, start=1):
        lengths, depths, grid = grids[label]
        trials = {(c.length, c.depth): c.trials for c in cells if c.label == label}
        text = [
            [("" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0%}") for j in range(len(depths))]
            for i in range(len(lengths))
        ]
        hover = [
            [
                f"{label}<br>length {lengths[i]} tokens<br>depth {depths[j]:g}<br>"
                f"trials {trials.get((lengths[i], depths[j]), 0)}<br>accuracy %{{z:.0%}}<extra></extra>"
                for j in range(len(depths))
            ]
            for i in range(len(lengths))
        ]
        fig.add_trace(
            go.Heatmap(
                z=grid.T,
                x=[_length_label(n) for n in lengths],
                y=[f"{d:g}" for d in depths],
                text=np.array(text).T,
                texttemplate="%{text}",
                hovertemplate=np.array(hover).T,
                zmin=0.0,
                zmax=1.0,
                colorscale=ACCURACY_SCALE,
                showscale=column == len(labels),
                colorbar=dict(title=dict(text="accuracy"), tickformat=".0%"),
            ),
            row=1,
            col=column,
        )
        fig.update_xaxes(title_text="length (tokens)", type="category", row=1, col=column)
    fig.update_yaxes(title_text="key depth", type="category", row=1, col=1)
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left"),
        plot_bgcolor="white",
        paper_bgcolor="white",
        margin=dict(l=60, r=20, t=70, b=50),
    )
    return fig


def chance_words(key: int | None) -> str:
    """What the chance line stands for, in words."""
    if key is None:
        return "chance: a random key"
    digits = len(str(key))
    return f"chance: a random {digits}-digit key, log(1/{keys_with_digits(digits):,})"


def logprob_range(values: Sequence[float], chance: float) -> list[float]:
    """The log p axis: from the chance level (or below it, where a value is) up to 0, whatever the curve.
    A fixed scale keeps a change of a few thousandths near 0 from looking like a fall."""
    low = min([chance, *(v for v in values if math.isfinite(v))])
    return [1.04 * low, -0.02 * low]  # a little room, so markers at the ends are drawn whole


def retention_figure(
    points: Sequence[RetentionPoint], key: int | None = None, title: str = "Does the memory still hold the key?"
) -> go.Figure:
    """Key log-probability (line) and greedy retrieval success (markers) against blocks since the key. The
    log p axis runs from the chance level of a random key of the key's length (a labelled line;
    ``famviz.probes.passkey.chance_key_logprob``) to 0, so its scale does not follow the data."""
    if not points:
        return empty_figure("no probe yet: the key has not gone by", title)
    x = [p.blocks_since_key for p in points]
    logprobs = [p.key_logprob for p in points]
    chance = chance_key_logprob(key)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=x,
            y=logprobs,
            mode="lines+markers",
            name="log p(key)",
            line=dict(color="#444"),
            customdata=[math.exp(v) for v in logprobs],
            hovertemplate="blocks since key %{x}<br>log p(key) %{y:.3f} (p %{customdata:.1%})<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_hline(
        y=chance,
        line=dict(color="#999", dash="dot"),
        annotation=dict(text=f"{chance_words(key)} = {chance:.1f}", font=dict(size=11, color="#666")),
        annotation_position="top left",
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[1.0 if p.correct else 0.0 for p in points],
            mode="markers",
            name="retrieved",
            marker=dict(
                size=11,
                symbol=["circle" if p.correct else "x" for p in points],
                color=["#2166ac" if p.correct else "#b2182b" for p in points],
            ),
            customdata=[[p.predicted if p.predicted is not None else "none", p.tokens] for p in points],
            hovertemplate="blocks since key %{x}<br>answer %{customdata[0]}<br>tokens %{customdata[1]}<extra></extra>",
        ),
        secondary_y=True,
    )
    subtitle = f" (key {key})" if key is not None else ""
    fig.update_layout(
        title=dict(text=title + subtitle, x=0.01, xanchor="left"),
        plot_bgcolor="white",
        paper_bgcolor="white",
        legend=dict(orientation="h", y=-0.2),
        margin=dict(l=60, r=60, t=50, b=60),
    )
    # Whole blocks only: with "d" alone, plotly's fractional ticks of a short curve read "0 1 1 2 2".
    fig.update_xaxes(
        title_text="blocks since the key went by",
        tickformat="d",
        tick0=0,
        dtick=max(1, math.ceil(max((p.blocks_since_key for p in points), default=1) / 10)),
    )
    fig.update_yaxes(
        title_text="log p(key tokens)", range=logprob_range(logprobs, chance), autorange=False, secondary_y=False
    )
    fig.update_yaxes(
        title_text="retrieved", range=[-0.15, 1.15], tickvals=[0, 1], ticktext=["no", "yes"], secondary_y=True
    )
    return fig


def intervention_heatmap(result: dict, title: str | None = None) -> go.Figure:
    """Δ log p(target) per (layer, block) of a FAM intervention (``famviz.probes.ablation``'s ``to_dict()``), on a
    diverging scale centred on 0; cells not measured yet stay blank. A second panel shows the head groups
    of the chosen layer when they were measured."""
    delta = result.get("delta_logprob")
    if not delta:
        return empty_figure("no interventions yet", title or "FAM interventions")
    z = np.array([[np.nan if v is None else v for v in row] for row in delta], dtype=float)
    rows = [str(layer) for layer in result["layers"]]
    columns = [f"after {b}" for b in result["blocks"]]
    values = result.get("logprob", {})
    reference = result.get("reference", "clean")
    heads = result.get("head_group_delta_logprob")
    everything = np.concatenate([z.ravel(), np.array([np.nan if v is None else v for v in (heads or [])], dtype=float)])
    bound = max(1e-3, float(np.nanmax(np.abs(everything))) if np.isfinite(everything).any() else 1.0)
    if heads:
        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.8, 0.2],
            horizontal_spacing=0.08,
            subplot_titles=["layers × blocks", f"layer {result['head_layer']}: KV head groups"],
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=columns,
            y=rows,
            zmid=0.0,
            zmin=-bound,
            zmax=bound,
            colorscale="RdBu",
            text=[["" if np.isnan(v) else (f"{v:+.2f}" if bound < 1 else f"{v:+.1f}") for v in row] for row in z],
            texttemplate="%{text}" if z.size <= 200 else None,
            hovertemplate="layer %{y}<br>FAM replaced %{x} blocks<br>Δ log p %{z:+.2f}<extra></extra>",
            colorbar=dict(title=dict(text="Δ log p")),
            showscale=True,
        ),
        row=1,
        col=1,
    )
    if heads:
        hz = np.array([[np.nan if v is None else v for v in heads]], dtype=float).T
        fig.add_trace(
            go.Heatmap(
                z=hz,
                x=["Δ"],
                y=[f"group {g}" for g in range(len(heads))],
                zmid=0.0,
                zmin=-bound,
                zmax=bound,
                colorscale="RdBu",
                showscale=False,
                hovertemplate="%{y}<br>Δ log p %{z:+.2f}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="FAM replaced after block", type="category", row=1, col=1)
    fig.update_yaxes(title_text="layer", type="category", row=1, col=1)
    summary = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
    heading = title or (
        f"FAM {result.get('method', '')}: Δ log p(target) against the {reference} run"
        + (f" (mean log p: {summary}; {result.get('trials', 0)} trials)" if summary else "")
    )
    fig.update_layout(
        title=dict(text=heading, x=0.01, xanchor="left", font=dict(size=13)),
        plot_bgcolor="white",
        paper_bgcolor="white",
        margin=dict(l=60, r=20, t=70, b=50),
        height=max(320, 16 * len(rows) + 140),
    )
    return fig


def attribution_figure(
    scores: np.ndarray, key_span: tuple[int, int], question_start: int, block_size: int, title: str | None = None
) -> go.Figure:
    """|gradient × input| of the answer's log p on every prompt token (``famviz.probes.attribution``), the key
    sentence shaded, the question's start and the block boundaries marked."""
    magnitude = np.abs(np.asarray(scores, dtype=np.float32))
    fig = go.Figure(
        go.Bar(
            x=np.arange(len(magnitude)),
            y=magnitude,
            marker=dict(color="#3b6fb6", line=dict(width=0)),
            hovertemplate="token %{x}<br>|attribution| %{y:.3g}<extra></extra>",
            name="|gradient × input|",
        )
    )
    fig.add_vrect(x0=key_span[0] - 0.5, x1=key_span[1] - 0.5, fillcolor="#e4572e", opacity=0.25, line_width=0)
    fig.add_annotation(x=(key_span[0] + key_span[1]) / 2, y=1, yref="paper", text="key", showarrow=False)
    fig.add_vline(x=question_start - 0.5, line=dict(color="#555", dash="dash"))
    for start in range(block_size, len(magnitude), block_size):
        fig.add_vline(x=start - 0.5, line=dict(color="#ccc", width=1))
    fig.update_layout(
        title=title or "Where the answer came from: attribution through the memory",
        xaxis_title="prompt token (grey: block boundaries; dashed: the question)",
        yaxis_title="|gradient × input|",
        yaxis_type="log",
        bargap=0,
        plot_bgcolor="white",
        showlegend=False,
    )
    return fig

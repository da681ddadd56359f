"""The loss curve of a training run (``loss_curve.html``, and PNG where kaleido can write it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger("famviz.training")


def loss_curve_figure(history: list[dict], mode: str = "fam") -> go.Figure | None:
    """The training loss per data kind (their scales differ: a PassKey answer against a whole text) with
    moving means, read-out probes asked in their block and across a block boundary apart, and, when the run
    evaluated, the held-out PassKey key log-probability with the prompt length of each evaluation (curricula
    change it). None for a history without steps."""
    steps = [r for r in history if "loss" in r]
    if not steps:
        return None
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS
    from plotly.subplots import make_subplots

    window = 25
    evals = [r for r in history if "eval" in r]
    panels = 2 if evals else 1  # no empty lower panel for a run without evaluations
    figure = make_subplots(
        rows=panels,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.62, 0.38] if evals else None,
        vertical_spacing=0.08,
    )
    for index, kind in enumerate(sorted({r["kind"] for r in steps})):
        rows = [r for r in steps if r["kind"] == kind]
        x, y = [r["step"] for r in rows], [r["loss"] for r in rows]
        smooth = [sum(y[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1) for i in range(len(y))]
        color = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
        figure.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="markers",
                marker=dict(size=3, opacity=0.3, color=color),
                name=f"{kind}: per step",
                legendgroup=kind,
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=x,
                y=smooth,
                mode="lines",
                line=dict(color=color),
                name=f"{kind}: mean of last {window} steps",
                legendgroup=kind,
            ),
            row=1,
            col=1,
        )
        probed = [r for r in rows if r.get("loss_readout") is not None]
        split = [r for r in probed if r.get("readout_split")]  # probes asked across a block boundary
        in_block = [r for r in probed if not r.get("readout_split")]
        series = [("loss_main", "the question's answer", "dot", probed)]
        if split:  # the round-length case and the in-block case learn at different rates: one line each
            series += [
                ("loss_readout", "read-out probes in their block", "dash", in_block),
                ("loss_readout", "read-out probes across a block boundary", "dashdot", split),
            ]
        else:
            series.append(("loss_readout", "read-out probes", "dash", probed))
        for field_name, label, dash, records in series:
            if not records:
                continue
            ys = [r[field_name] for r in records]
            means = [sum(ys[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1) for i in range(len(ys))]
            figure.add_trace(
                go.Scatter(
                    x=[r["step"] for r in records],
                    y=means,
                    mode="lines",
                    line=dict(color=color, dash=dash),
                    legendgroup=kind,
                    name=f"{kind}: {label} (mean of last {window})",
                ),
                row=1,
                col=1,
            )
    if evals:
        labels = [f"{r['eval']['length']} tokens, {r['eval']['accuracy']:.0%} of {r['eval']['trials']}" for r in evals]
        figure.add_trace(
            go.Scatter(
                x=[r["step"] for r in evals],
                y=[r["eval"]["key_logprob"] for r in evals],
                mode="lines+markers+text",
                text=[str(r["eval"]["length"]) for r in evals],
                textposition="top center",
                cliponaxis=False,
                line=dict(color="#444"),
                customdata=labels,
                name="key log-prob (label: tokens)",
                hovertemplate="step %{x}: %{y:.2f}<br>%{customdata}<extra></extra>",
            ),
            row=2,
            col=1,
        )
    figure.update_layout(title=f"{mode} fine-tuning", template="plotly_white", width=900, height=620 if evals else 420)
    figure.update_xaxes(title_text="step", row=panels, col=1)
    figure.update_yaxes(title_text="training loss (weighted)", row=1, col=1)
    if evals:
        figure.update_yaxes(title_text="held-out log p(key)<br>depth 0, teacher-forced", row=2, col=1)
    return figure


def write_loss_curve(history: list[dict], out: Path, mode: str = "fam") -> Path | None:
    """``loss_curve.html`` in ``out`` (PNG too when kaleido can) of ``loss_curve_figure``."""
    figure = loss_curve_figure(history, mode)
    if figure is None:
        return None
    path = out / "loss_curve.html"
    figure.write_html(str(path), include_plotlyjs=True)
    try:
        figure.write_image(str(out / "loss_curve.png"))
    except Exception as exc:  # noqa: BLE001 - no Chromium: the HTML is the figure
        log.info("no PNG loss curve (%s); loss_curve.html has it", type(exc).__name__)
    return path

"""The loss curve of a training run (``loss_curve.html``, and PNG where kaleido can write it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger("famviz.training")


WINDOW = 25  # steps in each moving mean


def _moving_mean(values: list[float], window: int = WINDOW) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1) for i in range(len(values))]


def loss_curve_figure(history: list[dict], mode: str = "fam") -> go.Figure | None:
    """The training loss per data kind (their scales differ: a PassKey answer against a whole text) with
    moving means, read-out probes asked in their block and across a block boundary apart, and, when the run
    evaluated, the held-out PassKey key log-probability with the prompt length of each evaluation (curricula
    change it). None for a history without steps."""
    steps = [r for r in history if "loss" in r]
    if not steps:
        return None
    from plotly.colors import DEFAULT_PLOTLY_COLORS
    from plotly.subplots import make_subplots

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
        color = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
        for trace in _kind_traces(kind, [r for r in steps if r["kind"] == kind], color):
            figure.add_trace(trace, row=1, col=1)
    if evals:
        figure.add_trace(_evaluation_trace(evals), row=2, col=1)
    figure.update_layout(title=f"{mode} fine-tuning", template="plotly_white", width=900, height=620 if evals else 420)
    figure.update_xaxes(title_text="step", row=panels, col=1)
    figure.update_yaxes(title_text="training loss (weighted)", row=1, col=1)
    if evals:
        depths = ", ".join(f"{d:g}" for d in sorted({r["eval"].get("depth", 0.0) for r in evals}))
        figure.update_yaxes(title_text=f"held-out log p(key)<br>depth {depths}, teacher-forced", row=2, col=1)
    return figure


def _kind_traces(kind: str, rows: list[dict], color: str) -> list[go.Scatter]:
    """One data kind's losses: every step, their moving mean, and the PassKey answer and read-out probes."""
    import plotly.graph_objects as go

    x, y = [r["step"] for r in rows], [r["loss"] for r in rows]
    marker = dict(size=3, opacity=0.3, color=color)
    traces = [
        go.Scatter(x=x, y=y, mode="markers", marker=marker, name=f"{kind}: per step", legendgroup=kind),
        go.Scatter(
            x=x,
            y=_moving_mean(y),
            mode="lines",
            line=dict(color=color),
            name=f"{kind}: mean of last {WINDOW} steps",
            legendgroup=kind,
        ),
    ]
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
        if records:
            traces.append(
                go.Scatter(
                    x=[r["step"] for r in records],
                    y=_moving_mean([r[field_name] for r in records]),
                    mode="lines",
                    line=dict(color=color, dash=dash),
                    legendgroup=kind,
                    name=f"{kind}: {label} (mean of last {WINDOW})",
                )
            )
    return traces


def _evaluation_trace(evals: list[dict]) -> go.Scatter:
    """The held-out PassKey key log-probability per evaluation, labelled with its prompt length."""
    import plotly.graph_objects as go

    labels = [f"{r['eval']['length']} tokens, {r['eval']['accuracy']:.0%} of {r['eval']['trials']}" for r in evals]
    return go.Scatter(
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
    )


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

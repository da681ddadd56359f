"""Paper-ready export of the inspector's figures: PNG, SVG, PDF (kaleido + a Chromium) and
self-contained HTML (always available).

    >>> from famviz import export
    >>> fig = export.trace_figure(trace, "heatmap")                 # a name from FIGURES
    >>> export.write_figure(fig, "heatmap.pdf", caption=export.caption_of(trace))

Exported copies get publication styling: a fixed size, larger fonts, labelled colour bars and the
run's configuration in a caption under the plot (and, for HTML/SVG, as JSON metadata in the file).
Static formats need a Chromium-based browser (Debian's ``chromium``, installed by ``make setup``);
``static_export_problem()`` says why they are unavailable, and HTML still works.
"""

from __future__ import annotations

import html as html_lib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from famviz.errors import FamvizError

if TYPE_CHECKING:
    from famviz.viz.inspector import Run

FORMATS = ("png", "svg", "pdf", "html")
STATIC_FORMATS = ("png", "svg", "pdf")
PUBLICATION_FONT = dict(family="Helvetica, Arial, sans-serif", size=14, color="#111")
BROWSER_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class ExportError(FamvizError):
    """A figure could not be exported (unknown name or format, no browser, unwritable path)."""


@dataclass(frozen=True)
class FigureSpec:
    name: str
    description: str
    build: Callable  # (Run) -> go.Figure
    size: tuple[int, int]  # exported width, height in px (at scale 1; PNG is written at scale 2)
    cli_options: str = ""  # the `famviz export` options that choose what it shows (the app has controls)
    both_modes: bool = False  # draws a compared run's second mode too (the others show the run's own mode only)


def _specs() -> dict[str, FigureSpec]:
    specs = [
        FigureSpec(
            "heatmap",
            "layer × block share of attention on the chosen target",
            lambda run: run.heatmap(),
            (900, 520),
            "--view",
        ),
        FigureSpec(
            "heads",
            "drill-down: layer × head shares of one block",
            lambda run: run.heads(),
            (640, 620),
            "--block, --view",
        ),
        FigureSpec(
            "trajectory",
            "2-D trajectory of FAM states across blocks (PCA or UMAP)",
            lambda run: run.trajectory(),
            (760, 560),
            "--method",
        ),
        FigureSpec(
            "dynamics", "FAM norm and update size per layer over blocks", lambda run: run.dynamics(), (900, 620)
        ),
        FigureSpec(
            "lens",
            "memory lens: each FAM slot's top tokens, slot × block (where the run recorded it)",
            lambda run: run.lens(),
            (1000, 780),
            "--layer, --block",
        ),
        FigureSpec(
            "slots",
            "per-slot views: each FAM slot's norm, update and attention received, slot × block (where recorded)",
            lambda run: run.slots(),
            (1000, 900),
            "--layer",
        ),
        FigureSpec(
            "nll",
            "next-token loss per block (two modes and the memory benefit when compared)",
            lambda run: run.loss(),
            (900, 520),
            both_modes=True,
        ),
    ]
    return {spec.name: spec for spec in specs}


FIGURES: dict[str, FigureSpec] = _specs()


def figure_help() -> str:
    return "; ".join(
        f"{spec.name}: {spec.description}" + (f" ({spec.cli_options})" if spec.cli_options else "")
        for spec in FIGURES.values()
    )


# -- configuration caption and file names ----------------------------------------------------------------
def shows_both_modes(run: Run, name: str | None) -> bool:
    """Whether figure ``name`` (None: the whole run) of ``run`` draws a compared mode beside its own."""
    return bool(run.compare_mode) and (name is None or (name in FIGURES and FIGURES[name].both_modes))


def caption_of(run: Run, name: str | None = None) -> str:
    """The run's caption for figure ``name``: "mode fam vs bswa" only on a figure that draws both."""
    return run.caption(with_compare=shows_both_modes(run, name))


def slug(text: str, limit: int = 40) -> str:
    """A file-name part: lower case, every run of other characters one dash, at most ``limit`` characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-")


def adapter_tag(adapter: str | None) -> str:
    """An adapter's short name for file names: "untuned" for none; a shipped adapter's own suffix
    ("smollm2-135m-fam64-block256-mem0-balanced" -> "balanced"), since its geometry is in the caption."""
    if not adapter:
        return "untuned"
    name = Path(adapter).name
    suffix = re.search(r"-fam\d+-block\d+-mem\d+-(.+)$", name)
    return slug(suffix.group(1) if suffix else name)


def file_stem(*parts: str | None) -> str:
    """("famviz", "heatmap", "fam", "balanced", "GPL-3 licence") -> "famviz-heatmap-fam-balanced-gpl-3-licence";
    empty parts are left out."""
    return "-".join(filter(None, (slug(part) for part in parts if part)))


def run_file_stem(run: Run, kind: str) -> str:
    """A file name (no suffix) for ``kind`` of ``run`` (a name from FIGURES, or e.g. "trace" for the whole
    run): what, the mode(s) it shows, the adapter's short name, the document."""
    meta = run.trace.meta if run.trace is not None else {}
    both = shows_both_modes(run, kind if kind in FIGURES else None)
    mode = run.config.mode + (f" vs {run.compare_mode}" if both else "")
    adapter = adapter_tag(meta.get("adapter")) if "adapter" in meta else None  # old traces did not record it
    return file_stem("famviz", kind, mode, adapter, run.document)


def metadata_of(run: Run) -> dict:
    """What reproduces a figure: model, engine config, document, and the figure's own choices."""
    meta = run.trace.meta if run.trace is not None else {}
    return {
        "generator": "famviz",
        "model": meta.get("model"),
        "adapter": meta.get("adapter"),
        "model_label": run.model_label,
        "config": run.config.to_dict(),
        "dtype": meta.get("dtype"),
        "document": run.document,
        "tokens": run.tokens_done,
        "blocks": run.blocks_done,
        "compare_mode": run.compare_mode,
        "view": run.view,
        "block": run.shown_block,
        "layer": run.layer,
        "trajectory_method": run.method,
    }


# -- styling -------------------------------------------------------------------------------------------------
def publication_figure(fig: go.Figure, caption: str = "", size: tuple[int, int] = (900, 560)) -> go.Figure:
    """A styled copy: fixed size, readable fonts, caption under the plot; the original is untouched."""
    out = go.Figure(fig)
    width, height = size
    bottom = 70 + (50 if caption else 0)
    out.update_layout(
        width=width,
        height=height,
        autosize=False,
        font=PUBLICATION_FONT,
        title=dict(font=dict(size=17)),
        paper_bgcolor="white",
        plot_bgcolor="white",
        margin=dict(l=80, r=40, t=80, b=bottom),
    )
    for trace in out.data:
        if getattr(trace, "colorbar", None) is not None and hasattr(trace, "colorscale"):
            trace.colorbar.title.font = dict(size=14)
            trace.colorbar.tickfont = dict(size=12)
    if caption:
        annotations = list(out.layout.annotations or [])
        annotations.append(
            dict(
                text=_wrap(html_lib.escape(caption), width // 8),
                x=0,
                y=0,
                xref="paper",
                yref="paper",
                yshift=-(bottom - 12),
                xanchor="left",
                yanchor="bottom",
                showarrow=False,
                align="left",
                font=dict(size=11, color="#444"),
            )
        )
        out.update_layout(annotations=annotations)
    return out


def _wrap(caption: str, max_chars: int) -> str:
    """Break a ' · '-separated caption into lines of at most ~max_chars characters."""
    lines, line = [], ""
    for part in caption.split(" · "):
        candidate = f"{line} · {part}" if line else part
        if line and len(candidate) > max_chars:
            lines.append(line)
            candidate = part
        line = candidate
    return "<br>".join(lines + [line])


# -- static export ---------------------------------------------------------------------------------------------
_KALEIDO_LOCK = threading.Lock()
_KALEIDO_STARTED = False


def find_browser() -> str | None:
    """The Chromium kaleido will drive: $BROWSER_PATH, else the first Chromium-like browser on PATH."""
    explicit = os.environ.get("BROWSER_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in BROWSER_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def static_export_problem() -> str | None:
    """None when PNG/SVG/PDF export can work, else why not (one sentence for the UI)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "PNG/SVG/PDF export needs the kaleido package (pip install kaleido); HTML export works."
    if find_browser() is None:
        return (
            "PNG/SVG/PDF export needs a Chromium browser and none was found (install Debian's "
            "`chromium`, e.g. `make setup`, or set BROWSER_PATH); HTML export works."
        )
    return None


def _static_bytes(fig: go.Figure, fmt: str) -> bytes:
    global _KALEIDO_STARTED
    problem = static_export_problem()
    if problem:
        raise ExportError(problem)
    import kaleido

    with _KALEIDO_LOCK:  # one browser, started once: repeat exports take ~0.1 s instead of ~2 s
        if not _KALEIDO_STARTED:
            browser = find_browser()
            if browser and not os.environ.get("BROWSER_PATH"):
                os.environ["BROWSER_PATH"] = browser
            kaleido.start_sync_server(silence_warnings=True)
            _KALEIDO_STARTED = True
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kopts ignored when using a server"
                return fig.to_image(format=fmt, scale=2 if fmt == "png" else 1)
        except Exception as exc:  # noqa: BLE001 - a browser failure is a message, not a crash
            raise ExportError(
                f"{fmt.upper()} export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None


def _html_text(fig: go.Figure, metadata: dict, caption: str) -> str:
    page = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False, "responsive": False})
    head = (
        f'<meta name="generator" content="famviz">\n'
        f'<meta name="famviz-metadata" content="{html_lib.escape(json.dumps(metadata), quote=True)}">\n'
        f"<title>{html_lib.escape(caption or 'famviz figure')}</title>\n"
    )
    return page.replace("<head>", "<head>\n" + head, 1)


def _svg_with_metadata(svg: bytes, metadata: dict) -> bytes:
    text = svg.decode("utf-8")
    at = text.find(">", text.find("<svg")) + 1
    if at <= 0:
        return svg
    block = f"<metadata>{html_lib.escape(json.dumps(metadata))}</metadata>"
    return (text[:at] + block + text[at:]).encode("utf-8")


def figure_bytes(
    fig: go.Figure, fmt: str, *, caption: str = "", metadata: dict | None = None, size: tuple[int, int] = (900, 560)
) -> bytes:
    """The exported file's content: publication-styled ``fig`` in ``fmt`` (png, svg, pdf or html)."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    styled = publication_figure(fig, caption, size)
    metadata = dict(metadata or {}, caption=caption)
    if fmt == "html":
        return _html_text(styled, metadata, caption).encode("utf-8")
    data = _static_bytes(styled, fmt)
    return _svg_with_metadata(data, metadata) if fmt == "svg" else data


def write_figure(fig: go.Figure, path: str | Path, fmt: str | None = None, **kwargs) -> Path:
    """Write ``figure_bytes`` to ``path`` (format from the suffix unless given)."""
    path = Path(path).expanduser()
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    data = figure_bytes(fig, fmt, **kwargs)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file name such as {path / ('figure.' + fmt)}")
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# -- figures of a run or a trace file ---------------------------------------------------------------------------
def run_figure(run: Run, name: str) -> go.Figure:
    if name not in FIGURES:
        raise ExportError(f"unknown figure {name!r}; figures: {', '.join(FIGURES)}")
    return FIGURES[name].build(run)


def export_run_figure(run: Run, name: str, fmt: str, path: str | Path) -> Path:
    """Export one of ``FIGURES`` of a run (live or replayed) with its caption and metadata."""
    fig = run_figure(run, name)
    if not fig.data:
        message = fig.layout.annotations[0].text if fig.layout.annotations else "no data"
        raise ExportError(f"the {name} figure has nothing to draw for this run: {message}")
    return write_figure(
        fig,
        path,
        fmt,
        caption=caption_of(run, name),
        metadata=dict(metadata_of(run), figure=name),
        size=FIGURES[name].size,
    )


def export_trace_file(
    trace_path: str | Path,
    name: str,
    fmt: str,
    out: str | Path,
    *,
    view: str | None = None,
    block: int | None = None,
    layer: int | None = None,
    method: str = "PCA",
) -> Path:
    """Headless export (``python -m famviz export``): the same figures from a saved trace, no model."""
    if name not in FIGURES:
        raise ExportError(f"unknown figure {name!r}; figures: {', '.join(FIGURES)}")
    fmt = _export_format(fmt or Path(out).suffix.lstrip("."))
    run = _trace_run(trace_path, view=view, block=block, layer=layer, method=method)
    return export_run_figure(run, name, fmt, out)


def export_trace_figures(
    trace_path: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    view: str | None = None,
    block: int | None = None,
    layer: int | None = None,
    method: str = "PCA",
) -> tuple[list[Path], dict[str, str]]:
    """Every figure of a saved trace into ``out_dir`` (created if missing), in one process (a static format's
    browser starts once); each file named by figure, mode, adapter and document. Returns the files written and,
    for each figure the trace has nothing for (e.g. no lens recorded), why it was skipped."""
    fmt = _export_format(fmt)
    run = _trace_run(trace_path, view=view, block=block, layer=layer, method=method)
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--out {folder} is a file; with --figure all it names a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {folder}: {exc.strerror or exc}") from None
    written, skipped = [], {}
    for name in FIGURES:
        try:
            written.append(export_run_figure(run, name, fmt, folder / f"{run_file_stem(run, name)}.{fmt}"))
        except ExportError as exc:
            if not str(exc).startswith(f"the {name} figure has nothing to draw"):
                raise
            skipped[name] = str(exc)
    return written, skipped


def _export_format(fmt: str | None) -> str:
    """A known format that this machine can write, or an ExportError saying why not."""
    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt in STATIC_FORMATS and (problem := static_export_problem()):
        raise ExportError(problem)
    return fmt


def _trace_run(trace_path: str | Path, *, view: str | None, block: int | None, layer: int | None, method: str) -> Run:
    """A saved trace as a run showing the chosen view, block, layer and trajectory method."""
    from famviz.core.trace import Trace
    from famviz.viz import figures
    from famviz.viz.inspector import TRAJECTORY_METHODS, Run

    if not Path(trace_path).is_file():
        raise ExportError(f"trace file {trace_path} does not exist")
    run = Run.from_trace(Trace.load(trace_path), name=Path(trace_path).name)
    if view is not None:
        if view not in figures.SHARE_VIEWS:
            raise ExportError(f"unknown view {view!r}; views: {', '.join(figures.SHARE_VIEWS)}")
        run.view = view
    if block is not None:
        if not 0 <= block < run.blocks_done:
            raise ExportError(f"block {block} is not in the trace (it has blocks 0 to {run.blocks_done - 1})")
        run.block = block
    run.layer = layer
    if method not in TRAJECTORY_METHODS:
        raise ExportError(f"unknown trajectory method {method!r}; use {' or '.join(TRAJECTORY_METHODS)}")
    if method == "UMAP" and run.features is not None and run.features.layers:
        from famviz.viz.inspector import umap_2d

        run.umap_result = (
            run.features.n_blocks,
            {layer_: umap_2d(run.features.array(layer_)) for layer_ in run.features.layers},
        )
    run.method = method
    return run


def download_dir() -> Path:
    """A fresh folder for one file the app hands to the browser (Gradio serves files under the temp dir)."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / "famviz-exports"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder))


def export_for_download(write: Callable[[], Path]) -> tuple[str | None, str]:
    """Run one export from the app: (file, note), or (None, a message saying what went wrong)."""
    try:
        path = Path(write())
    except FamvizError as exc:
        return None, f"**Error:** {exc}"
    except Exception as exc:  # the app stays up; details go to the log
        logging.getLogger("famviz.app").exception("export failed")
        return None, f"**Error:** export failed: {type(exc).__name__}: {exc}"
    return str(path), f"Exported **{path.name}** ({path.stat().st_size / 1024:,.0f} KB)."

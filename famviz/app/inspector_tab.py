"""The app's memory inspector tab: stream a document block by block and watch where attention goes, what
the FAM reads and how its state evolves; drill into a block, replay a saved trace, export any plot.

Every handler takes the session's ``Run`` (``famviz.viz.inspector``; gr.State) and never raises: bad input
becomes one error status and the plots stay as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from famviz.app import MIN_REDRAW_SECONDS
from famviz.app.hub import AppContext, ModelHub, model_key, shipped_adapters, status_notes
from famviz.app.inputs import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PASSKEY_TOKENS,
    ERROR_MARK,
    MAX_TRACE_BYTES,
    SOURCES,
    UPLOAD_LABEL,
    document_cut,
    error_status,
    keeping_caption,
    parse_settings,
    read_input_document,
)
from famviz.app.views import InspectorViews
from famviz.core.config import MODES
from famviz.core.engine import Stream
from famviz.core.fam_model import FamModel
from famviz.core.modes import mode_summary
from famviz.core.tokenize import tokenize_prefix
from famviz.core.trace import Trace
from famviz.errors import DocumentError, FamvizError
from famviz.io.models import auto_dtype_note
from famviz.probes.attribution import attribute
from famviz.viz import export, figures
from famviz.viz.inspector import (
    DEFAULT_VIEW,
    MAX_LENS_LAYERS,
    TRAJECTORY_METHODS,
    Run,
    StateFeatures,
    app_channels,
    default_lens_layers,
    default_trajectory_layers,
    parse_layers,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from famviz.app.hub import AppAdapter
    from famviz.app.inputs import InputDocument
    from famviz.core.config import FamConfig
    from famviz.core.model import LoadedModel

log = logging.getLogger("famviz.app")

NO_COMPARE = "off"
STOP_WAIT_SECONDS = 120.0  # longest wait for the block in flight at Stop (a block of 8,192 tokens on a CPU)
MEAN_LAYER = "mean"

# What each plot shows, under it: a first-time user should not need the paper to read the page.
PLOT_NOTES = {
    "heatmap": "Each cell: the share of one layer's attention (mean over heads and the block's tokens) that "
    "goes to the chosen target; the rows of a block sum to 1 over FAM, memory blocks, own block and (sink mode) "
    "the kept first tokens. "
    "A high FAM share means the block leans on the memory. An untrained memory often draws a large "
    "share as a *sink* (attention parked there, little read from it), so read it with the loss below.",
    "trajectory": "Each point: the FAM state of one recorded layer after one block, projected to 2-D (PCA, or "
    "UMAP). Long steps: the memory is rewritten; points that stay put: it holds what it has.",
    "dynamics": "FAM norm: mean L2 norm of the FAM slots per layer. Update: 1 − cosine between the FAM before "
    "and after one block (0 = unchanged in direction, 1 = unrelated). A working memory stays "
    "bounded; a norm that keeps growing block after block is drift.",
    "nll": "Mean next-token loss (nats) of each block's tokens; lower is better. Pick **Compare with: bswa** "
    "to draw the same document with the same window and no memory: the gap is what the memory adds.",
    "lens": "Each cell: one FAM slot (row) after one block (column), decoded through the model's final norm "
    "and unembedding as if it were the last layer's output (the logit lens, applied to the memory); colour is "
    "the top token's probability, hover shows the slot's top tokens. It is a view of what the slot's vector "
    "points at in the vocabulary, not what the model reads out of it: most slots decode to a few sub-word "
    "tokens whatever the text, and a change after a block (a digit after a pass key) is the signal. "
    "The layer dropdown above picks the layer among those recorded (set them before Start).",
    "slots": "The FAM of one layer slot by slot (the dynamics view averages the slots): each slot's norm, how much "
    "one block changed it (1 − cosine), and the attention the block's tokens give it (the slots' values add up "
    "to the block's FAM share of that layer). A slot that keeps a fact changes little and is read when the fact "
    "is needed. Pick a slot above to shade the document by what that slot read.",
}


# The status's first error paragraph, repeated beside Start (the status line sits far above it).
ERROR_BESIDE_START_JS = (
    f"(status) => {{ const s = status || ''; const at = s.indexOf('{ERROR_MARK}'); if (at < 0) return ''; "
    "const end = s.indexOf('\\n\\n', at); return end < 0 ? s.slice(at) : s.slice(at, end); }"
)


# -- what every update sends -----------------------------------------------------------------------------
def with_shown_run(line: str, shown: Run | None) -> str:
    """``line`` (an error, "Loading…") followed by the status of the run whose plots stay on the page, so
    they never lose what made them (model, adapter, mode, document)."""
    return keeping_caption(line, shown.status() if shown is not None and shown.has_blocks() else None)


def error_update(message: str, shown: Run | None) -> InspectorViews:
    """One error (its paragraph also goes beside Start); every view, and the session's run, stay as they were."""
    return InspectorViews.only(status=with_shown_run(error_status(message), shown))


def _layer_choices(run: Run) -> list:
    n_layers = int(run.trace.meta.get("n_layers", 0)) if run.trace is not None else 0
    return [("mean over layers", MEAN_LAYER)] + [(f"layer {i}", str(i)) for i in range(n_layers)]


def refresh(run: Run, *, new_run: bool = False) -> InspectorViews:
    """Every view of ``run``; ``new_run``: its first draw, which also sets the layer choices and the view
    dropdown to the run's own."""
    last = max(run.blocks_done - 1, 0)
    slider = gr.update(maximum=max(last, 1), value=run.shown_block, interactive=run.blocks_done > 1)
    layer = (
        gr.update(choices=_layer_choices(run), value=MEAN_LAYER if run.layer is None else str(run.layer))
        if new_run
        else gr.skip()
    )
    return InspectorViews(
        status=run.status(),
        heatmap=run.heatmap(),
        heads=run.heads(),
        document=run.document_html(),
        trajectory=run.trajectory(),
        dynamics=run.dynamics(),
        nll=run.loss(),
        lens=run.lens(),
        slots=run.slots(),
        block=slider,
        layer=layer,
        view=gr.update(value=run.view) if new_run else gr.skip(),
        run=run,
    )


@dataclasses.dataclass
class StartedStreams:
    """What Start prepared before the first block: the document's tokens and the stream(s) to run over them."""

    ids: list[int]
    primary: Stream
    other: Stream | None  # the compare mode's stream (its losses only)
    run: Run


def stream_document(
    hub: ModelHub,
    model: str | None,
    adapter_dir: str | None,
    device: str | None,
    dtype: str | None,
    source: str,
    upload: str | None,
    pasted: str | None,
    passkey_tokens: float | str | None,
    mode: str,
    compare: str | None,
    block_size: float | str | None,
    fam_len: float | str | None,
    mem_blocks: float | str | None,
    max_tokens: float | str | None,
    trajectory_layers: str | None,
    lens_layers: str | None,
    token_shares: bool | None,
    previous: Run | None,
    *,
    redraw_seconds: float = MIN_REDRAW_SECONDS,
) -> Iterator[InspectorViews]:
    """The Start handler: yields an update once per block (every view at most every ``redraw_seconds``).

    Bad input yields one error status and leaves the plots (and the previous run) as they were.
    """
    key = model_key(model, adapter_dir, device, dtype)
    try:
        config, limit = parse_settings(mode, block_size, fam_len, mem_blocks, max_tokens)
        compare = _compare_mode(compare, config)
        if not hub.is_loaded(key):
            loading = f"Loading model **{key[0] or 'bundled'}**{' with adapter ' + key[1] if key[1] else ''}…"
            yield InspectorViews.only(status=with_shown_run(loading, previous))
        loaded, adapter = hub.for_choice(*key)
        document = read_input_document(source, upload, pasted, loaded.tokenizer, passkey_tokens, limit)
        layers = _recorded_layers(trajectory_layers, lens_layers, loaded.config.num_hidden_layers, config)
        layers = dataclasses.replace(layers, token_shares=bool(token_shares))
        started = _start_streams(loaded, adapter, config, compare, document, limit, layers, previous)
        started.run.model_key = key  # what an attribution of one of its predictions runs on
    except FamvizError as exc:
        yield error_update(str(exc), previous)
        return
    except Exception as exc:  # the app must survive anything; details go to the log
        log.exception("could not start a stream")
        yield error_update(f"could not start: {type(exc).__name__}: {exc}", previous)
        return
    run = started.run
    # The run is the session's from now on (Stop acts on it); the view dropdown shows the run's view.
    yield InspectorViews.only(status=run.status(), view=gr.update(value=run.view), run=run)
    log.info(
        "streaming %s: %d tokens, %d blocks, %s%s",
        run.document,
        len(started.ids),
        run.total_blocks,
        config,
        f" vs {compare}" if compare else "",
    )
    yield from _stream_blocks(started, redraw_seconds)
    log.info("done: %s (engine %.1f s of %.1f s)", run.status().replace("**", ""), run.engine_seconds, run.elapsed)


def _compare_mode(compare: str | None, config: FamConfig) -> str | None:
    """The second mode streamed beside the run (None: none), or a FamvizError."""
    compare = None if compare in (None, "", NO_COMPARE) else compare
    if compare is not None and compare not in MODES:
        raise FamvizError(f"compare mode must be one of {', '.join(MODES)} or {NO_COMPARE}, got {compare!r}.")
    if compare == config.mode:
        raise FamvizError(f"Compare needs a second mode different from {config.mode}.")
    return compare


@dataclasses.dataclass(frozen=True)
class RecordedLayers:
    """The layers whose FAM states (trajectories), memory lens and per-slot views a run records, and
    whether it records each token's own attention (the token drill-down)."""

    trajectory: list[int]
    lens: list[int]
    token_shares: bool = False


def _recorded_layers(trajectory: str | None, lens: str | None, n_layers: int, config: FamConfig) -> RecordedLayers:
    """The layer fields' choices (none in a mode without FAM slots), or a FamvizError saying what is wrong."""
    if not config.active_fam_len:
        return RecordedLayers([], [])
    try:
        return RecordedLayers(
            parse_layers(trajectory, n_layers),
            parse_layers(lens, n_layers, "memory lens layers", default=[], most=MAX_LENS_LAYERS),
        )
    except ValueError as exc:
        raise FamvizError(str(exc)) from None


def _start_streams(
    loaded: LoadedModel,
    adapter: AppAdapter | None,
    config: FamConfig,
    compare: str | None,
    document: InputDocument,
    limit: int,
    layers: RecordedLayers,
    previous: Run | None,
) -> StartedStreams:
    """The run's stream (and the compare mode's) over the document's first ``limit`` tokens, and its Run."""
    text, name, read_cut = document
    n_layers = loaded.config.num_hidden_layers
    fam_prompt = adapter.prompt_for(loaded, config) if adapter is not None else None
    ids, offsets = tokenize_prefix(loaded.tokenizer, text, limit)
    if not ids:
        raise DocumentError(f"{name}: the document has no tokens.")
    channels = app_channels(layers.trajectory, bool(config.active_fam_len), layers.lens)
    channels += ["block.*.token_share"] if layers.token_shares else []
    primary = Stream(loaded, config, channels=channels, fam_prompt=fam_prompt)
    other = None
    if compare is not None:
        other_config = dataclasses.replace(config, mode=compare)
        other_prompt = adapter.prompt_for(loaded, other_config) if adapter is not None else None
        other = Stream(loaded, other_config, record=False, fam_prompt=other_prompt)
    primary.describe_document(name, text, offsets)
    notes = status_notes(adapter, [config])
    primary.trace.set_notes(notes)
    run = Run(
        config=config,
        document=name,
        total_tokens=len(ids),
        trace=primary.trace,
        compare_mode=compare,
        document_cut=read_cut or document_cut(loaded.tokenizer, text, ids, offsets),
        features=StateFeatures(layers.trajectory) if layers.trajectory else None,
        notes=notes,
    )
    run.keep_view_of(previous)  # what the user was looking at, where this run's mode has it
    if previous is not None:
        run.layer = previous.layer if previous.layer is not None and previous.layer < n_layers else None
    return StartedStreams(ids, primary, other, run)


def _stream_blocks(started: StartedStreams, redraw_seconds: float) -> Iterator[InspectorViews]:
    """Block by block until done, stopped or failed; every view redrawn at most every ``redraw_seconds``."""
    run, last_redraw = started.run, 0.0
    primary_blocks = started.primary.blocks(started.ids)
    other_blocks = started.other.blocks(started.ids) if started.other is not None else None
    while run.blocks_done < run.total_blocks:
        if run.state != "streaming":  # stopped from the UI: the event is being cancelled
            return
        run.idle.clear()  # a block is being computed: Stop waits for it (it cannot be interrupted)
        try:
            began = time.perf_counter()
            next(primary_blocks)
            if other_blocks is not None:
                run.record_compare(next(other_blocks).nll)
            run.engine_seconds += time.perf_counter() - began
            run.record_block()
        except Exception as exc:  # keep what was computed; say what went wrong
            log.exception("stream failed at block %d", run.blocks_done)
            run.state, run.error = "failed", f"{type(exc).__name__}: {exc}"
            run.elapsed = time.perf_counter() - run.started
            run.idle.set()
            yield InspectorViews.only(status=run.status(), run=run)
            return
        run.blocks_done += 1
        run.tokens_done = started.primary.position
        run.elapsed = time.perf_counter() - run.started
        if run.blocks_done == run.total_blocks:
            run.state = "done"
        run.idle.set()
        if run.state == "stopped":  # Stop came during this block: its reply draws the block, nothing more runs
            return
        if run.state == "done" or run.blocks_done == 1 or time.perf_counter() - last_redraw >= redraw_seconds:
            yield refresh(run, new_run=run.blocks_done == 1)
            last_redraw = time.perf_counter()
        else:
            yield InspectorViews.only(status=run.status(), run=run)


def stop_run(run: Run | None) -> InspectorViews:
    """The Stop handler (runs beside the cancelled stream): every view as of the last finished block."""
    if run is None or run.state != "streaming":
        return InspectorViews.only()
    run.state = "stopped"
    # The block being computed when Stop came is finished and recorded anyway (a block cannot be interrupted):
    # wait for it, so that the views, the status and a downloaded trace all hold the same blocks.
    run.idle.wait(timeout=STOP_WAIT_SECONDS)
    run.elapsed = time.perf_counter() - run.started
    try:
        return refresh(run)
    except Exception:  # a block was being appended right now: the status is enough
        log.debug("stop: views skipped", exc_info=True)
        return InspectorViews.only(status=run.status())


def settled_status(run: Run | None) -> str | dict:
    """After Stop has finished: the run's status once more. A block update the cancelled stream had already
    sent can reach the page after Stop's own reply and would leave "Streaming" showing for good."""
    if run is None or run.state == "streaming":
        return gr.skip()
    return run.status()


# -- view controls (no model; each acts on the session's run only) ----------------------------------------------
def _view_handler(n_outputs: int) -> Callable[[Callable[..., tuple]], Callable[..., tuple]]:
    """View handlers may run while the session's stream appends a block to the same trace; a figure
    caught half-way is skipped (the stream's next update redraws it) instead of raising in the UI."""

    def wrap(handler: Callable[..., tuple]) -> Callable[..., tuple]:
        def safe(*args: object) -> tuple:
            try:
                return handler(*args)
            except Exception:
                log.debug("view update skipped", exc_info=True)
                skips = tuple(gr.skip() for _ in range(n_outputs))
                return skips[0] if n_outputs == 1 else skips

        safe.__name__, safe.__doc__, safe.__wrapped__ = handler.__name__, handler.__doc__, handler
        return safe

    return wrap


@_view_handler(2)
def change_view(view: str, run: Run | None) -> tuple:
    """Switch the heatmap target; a running stream picks the new view up at its next block."""
    if view not in figures.SHARE_VIEWS or run is None:
        return gr.skip(), gr.skip()
    run.view = view
    if not run.has_blocks():
        return gr.skip(), gr.skip()
    return run.heatmap(), run.heads()


@_view_handler(4)
def change_layer(layer: str | None, run: Run | None) -> tuple:
    """The layer the document is shaded by, framed in the drill-down and shown by the lens and slot views."""
    if run is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    run.layer = None if layer in (None, "", MEAN_LAYER) else int(layer)
    if not run.has_blocks():
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return run.heads(), run.document_html(), run.lens(), run.slots()


def _whole_number(text: float | str | None) -> int | None:
    """A position or slot typed in a field: None when empty; a ValueError (the view is skipped) when not a number."""
    return None if text is None or not str(text).strip() else int(float(str(text).strip()))


@_view_handler(1)
def change_token(token: float | str | None, run: Run | None) -> object:
    """Drill down into one token's own attention per layer and head (empty: the shown block's mean)."""
    if run is None:
        return gr.skip()
    run.token = _whole_number(token)
    return run.heads() if run.has_blocks() else gr.skip()


@_view_handler(1)
def change_content(content: bool, run: Run | None) -> object:
    """Shade only content tokens (sink-like ones out of the scale and the most-read lists), or every token."""
    if run is None:
        return gr.skip()
    run.content_only = bool(content)
    return run.document_html() if run.has_blocks() else gr.skip()


@_view_handler(2)
def change_slot(slot: float | str | None, run: Run | None) -> tuple:
    """The FAM slot whose own reads shade the document (empty: every slot's mean); a slot the FAM lacks is
    cleared from the field."""
    if run is None:
        return gr.skip(), gr.skip()
    chosen = _whole_number(slot)
    if chosen is not None and not 0 <= chosen < max(run.config.active_fam_len, 1):
        return gr.skip(), ""
    run.slot = chosen
    return (run.document_html() if run.has_blocks() else gr.skip()), gr.skip()


@_view_handler(5)
def select_block(block: float | str | None, follow: bool, run: Run | None) -> tuple:
    """Drill down into one block, or follow the latest: heatmap frame, head view, document window, lens."""
    if run is None or not run.has_blocks():
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    run.block = None if follow or block is None else int(block)
    return run.heatmap(), run.heads(), run.document_html(), run.lens(), gr.skip()


@_view_handler(5)
def drag_block(block: float | str | None, run: Run | None) -> tuple:
    """Moving the slider picks that block and stops following (else the next block would move it back)."""
    heatmap, heads, document, lens, _ = select_block.__wrapped__(block, False, run)
    return heatmap, heads, document, lens, False


def change_method(method: str, run: Run | None) -> tuple:
    """PCA now; UMAP starts in the background and the timer shows it when it is ready."""
    if method not in TRAJECTORY_METHODS or run is None:
        return gr.skip(), gr.Timer(active=False)
    run.method = method
    if not run.has_blocks():
        return gr.skip(), gr.Timer(active=False)
    figure = run.trajectory()
    return figure, gr.Timer(active=run.umap_pending())


def poll_umap(run: Run | None) -> tuple:
    """Timer tick while a UMAP fit runs: show it once done, then stop ticking."""
    if run is None or run.method != "UMAP":
        return gr.skip(), gr.Timer(active=False)
    if run.umap_pending():
        return gr.skip(), gr.skip()
    return run.trajectory(), gr.Timer(active=run.umap_pending() or run.state == "streaming")


# -- attribution of one prediction (runs the model) ------------------------------------------------------------
MAX_ATTRIBUTION_TOKENS = 4096  # the whole stream's graph is kept: about one training step's memory and time


def attribute_prediction(hub: ModelHub, position: float | str | None, run: Run | None) -> tuple:
    """Attribute the prediction of token ``position`` to every earlier token by gradient × input through the
    whole stream, and shade the document by it (its block shown); an empty position goes back to the FAM
    reads. Returns (document, note, block slider, follow)."""
    skip = gr.skip()
    if run is None or not run.has_blocks():
        return skip, "Stream a document first.", skip, skip
    if position is None or not str(position).strip():
        run.attribution = None
        return run.document_html(), "", skip, skip
    try:
        target = _attribution_target(position, run)
        loaded, adapter = hub.for_choice(*run.model_key)
        fam_prompt = adapter.prompt_for(loaded, run.config) if adapter is not None else None
        began = time.perf_counter()
        ids = run.trace.token_ids
        result = attribute(FamModel(loaded, run.config, fam_prompt=fam_prompt), ids[:target], [ids[target]])
    except FamvizError as exc:
        return skip, error_status(str(exc)), skip, skip
    except Exception as exc:  # the app stays up; details go to the log
        log.exception("attribution failed")
        return skip, error_status(f"attribution failed: {type(exc).__name__}: {exc}"), skip, skip
    run.attribution = (target, result.scores)
    run.block = max(i for i, start in enumerate(run.trace.block_starts) if start <= target)
    text = loaded.tokenizer.decode([ids[target]]) if loaded.tokenizer is not None else f"#{ids[target]}"
    note = (
        f"Token {target:,} ({text!r}, log p {result.target_logprob:.2f}): the document is shaded by |gradient × input| "
        f"of its log-probability on each earlier token, backpropagated through every FAM update "
        f"({time.perf_counter() - began:.1f} s). Clear the field for the FAM reads again."
    )
    return run.document_html(), note, gr.update(value=run.block), False


def _attribution_target(position: float | str, run: Run) -> int:
    """The token whose prediction to attribute, or a FamvizError saying why it cannot be."""
    if run.model_key is None:
        raise FamvizError("a replayed trace has no model: stream the document to attribute a prediction")
    if run.state == "streaming":
        raise FamvizError("wait until the stream is done (or Stop it) to attribute a prediction")
    try:
        target = int(float(position))
    except ValueError:
        raise FamvizError(f"the token to attribute must be a whole number, got {position!r}") from None
    if not 1 <= target < run.trace.n_tokens:
        raise FamvizError(f"the token to attribute must be between 1 and {run.trace.n_tokens - 1:,}")
    if target > MAX_ATTRIBUTION_TOKENS:
        raise FamvizError(f"attribution keeps the whole stream's graph: pick a token up to {MAX_ATTRIBUTION_TOKENS:,}")
    return target


# -- export, trace download and replay ----------------------------------------------------------------------------
def export_plot(name: str, fmt: str, run: Run | None) -> tuple:
    """Write one figure of the session's run in a paper-ready format; returns (file, note)."""
    if run is None or not run.has_blocks():
        return gr.skip(), "Nothing to export yet: stream a document or replay a trace first."
    path = export.download_dir() / f"{export.run_file_stem(run, name)}.{fmt}"
    file, note = export.export_for_download(lambda: export.export_run_figure(run, name, fmt, path))
    return file or gr.skip(), note


def download_trace(run: Run | None) -> tuple:
    """The whole run as an engine trace file (.npz) that the app and `famviz export` can replay."""
    if run is None or run.trace is None or run.trace.n_blocks == 0:
        return gr.skip(), "No run to download yet."
    try:
        path = run.trace.save(export.download_dir() / f"{export.run_file_stem(run, 'trace')}.npz")
    except OSError as exc:
        return gr.skip(), error_status(f"cannot write the trace: {exc.strerror or exc}")
    return str(path), f"Trace **{path.name}** ({path.stat().st_size / 1024**2:,.1f} MB): {run.blocks_done} blocks."


def replay_trace(upload: str | None, previous: Run | None) -> InspectorViews:
    """Load an uploaded trace file and show every view of it, without a model."""
    if not upload:
        return InspectorViews.only()
    path = Path(upload)
    try:
        if path.stat().st_size > MAX_TRACE_BYTES:
            raise FamvizError(f"{path.name} is larger than the {MAX_TRACE_BYTES // 1024**2} MB limit for traces.")
        trace = Trace.load(path)
        if trace.n_blocks == 0:
            raise FamvizError(f"{path.name} holds no blocks.")
        run = Run.from_trace(trace, name=path.name)
    except FamvizError as exc:
        return error_update(str(exc), previous)
    except Exception as exc:
        log.exception("replay failed")
        return error_update(f"cannot replay {path.name}: {type(exc).__name__}: {exc}", previous)
    run.keep_view_of(previous)
    return refresh(run, new_run=True)


@dataclasses.dataclass
class RunControls:
    """The left column's inputs of a run, in the Start handler's order after the Model panel's four."""

    source: gr.Radio
    upload: gr.File
    pasted: gr.Textbox
    passkey_tokens: gr.Number
    mode: gr.Radio
    compare: gr.Dropdown
    block_size: gr.Number
    fam_len: gr.Number
    mem_blocks: gr.Number
    max_tokens: gr.Number
    trajectory_layers: gr.Textbox
    lens_layers: gr.Textbox
    token_shares: gr.Checkbox

    def inputs(self) -> list:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


@dataclasses.dataclass
class ViewControls:
    """The right column: the status, what to show, and every plot."""

    status: gr.Markdown
    view: gr.Dropdown
    layer: gr.Dropdown
    block: gr.Slider
    follow: gr.Checkbox
    token: gr.Textbox
    heatmap: gr.Plot
    heads: gr.Plot
    document: gr.HTML
    method: gr.Radio
    trajectory: gr.Plot
    dynamics: gr.Plot
    nll: gr.Plot
    lens: gr.Plot
    slot: gr.Textbox
    content: gr.Checkbox
    attribute_at: gr.Textbox
    attribute_button: gr.Button
    attribution_note: gr.Markdown
    slots: gr.Plot


@dataclasses.dataclass
class ExportControls:
    figure_name: gr.Dropdown
    export_format: gr.Radio
    export_button: gr.Button
    trace_button: gr.Button
    file: gr.File
    note: gr.Markdown


def _model_panel(context: AppContext) -> list:
    """The Model panel (model, adapter, device, dtype), shared by every tab through ``context.model_inputs``."""
    startup_key = context.hub.default_key
    with gr.Accordion("Model", open=False, elem_id="model-panel"):
        model = gr.Textbox(
            startup_key[0] or "",
            label="Model (Hugging Face id or local path)",
            placeholder="empty: bundled SmolLM2-135M",
            elem_id="model",
        )
        adapter_dir = gr.Dropdown(
            [("none: untuned conversion (memory not trained)", ""), *shipped_adapters()],
            value=startup_key[1] or "",
            allow_custom_value=True,
            label="Adapter (or type a directory)",
            elem_id="adapter",
        )
        with gr.Row():
            device = gr.Dropdown(["auto", "cpu", "cuda"], value=startup_key[2], label="Device", elem_id="device")
            dtype = gr.Dropdown(
                ["auto", "bfloat16", "float32"],
                value=startup_key[3],
                label="Dtype",
                info=auto_dtype_note(),
                elem_id="dtype",
            )
        context.adapter_note = gr.Markdown("", elem_id="adapter-note")
        gr.Markdown("A changed model is loaded when you press Start (here or in the PassKey tab).")
    context.model_inputs[:] = [model, adapter_dir, device, dtype]
    return context.model_inputs


def _run_controls(context: AppContext, n_layers: int) -> RunControls:
    """Mode, geometry, trajectory layers and the document to stream."""
    defaults = context.defaults
    with gr.Row():
        mode = gr.Radio(list(MODES), value=defaults.mode, label="Mode", elem_id="mode", info=mode_summary())
        compare = gr.Dropdown(
            [NO_COMPARE, *MODES],
            value=NO_COMPARE,
            label="Compare with",
            elem_id="compare",
            info="same document, second mode",
        )
    with gr.Row():
        block_size = gr.Number(
            defaults.block_size, label="Block size (tokens)", precision=None, step=1, elem_id="block-size"
        )
        fam_len = gr.Number(defaults.fam_len, label="FAM length (slots)", precision=None, step=1, elem_id="fam-len")
    with gr.Row():
        mem_blocks = gr.Number(defaults.mem_blocks, label="Memory blocks", precision=None, step=1, elem_id="mem-blocks")
        max_tokens = gr.Number(DEFAULT_MAX_TOKENS, label="Max tokens", precision=None, step=1, elem_id="max-tokens")
    context.geometry_fields.append((block_size, fam_len, mem_blocks))
    trajectory_layers = gr.Textbox(
        ", ".join(map(str, default_trajectory_layers(n_layers))),
        label="Trajectory layers (FAM states recorded)",
        elem_id="trajectory-layers",
    )
    lens_layers = gr.Textbox(
        ", ".join(map(str, default_lens_layers(n_layers))),
        label=f"Slot layers: memory lens and per-slot views (at most {MAX_LENS_LAYERS}; empty: off)",
        elem_id="lens-layers",
    )
    token_shares = gr.Checkbox(
        False,
        label="Record each token's own attention (token drill-down)",
        info="every layer and head, about 2 KB per token on the bundled model",
        elem_id="token-shares",
    )
    source = gr.Radio(
        [(label, key) for key, label in SOURCES.items()], value="example", label="Document", elem_id="source"
    )
    passkey_tokens = gr.Number(
        DEFAULT_PASSKEY_TOKENS,
        label="PassKey haystack length (tokens; key at the start)",
        precision=0,
        elem_id="passkey-tokens",
    )
    upload = gr.File(label=f"Upload {UPLOAD_LABEL}", type="filepath", elem_id="upload")
    pasted = gr.Textbox(
        label="Or paste text", lines=4, max_lines=10, placeholder="Paste a document here", elem_id="pasted"
    )
    # Picking a file or typing text selects that source (in the browser, no round trip).
    upload.upload(None, None, source, js="() => 'upload'")
    pasted.input(None, None, source, js="() => 'paste'")
    passkey_tokens.input(None, None, source, js="() => 'passkey'")
    return RunControls(
        source,
        upload,
        pasted,
        passkey_tokens,
        mode,
        compare,
        block_size,
        fam_len,
        mem_blocks,
        max_tokens,
        trajectory_layers,
        lens_layers,
        token_shares,
    )


def _shading_controls() -> tuple:
    """What shades the document: one FAM slot's reads, content tokens only, or one prediction's attribution."""
    with gr.Row():
        slot = gr.Textbox(
            "",
            label="FAM slot (document shading: what this slot read)",
            placeholder="a slot number (empty: all slots)",
            elem_id="slot",
        )
        content = gr.Checkbox(
            False,
            label="Content tokens only",
            info="shade without the sink-like tokens: each block's first token, whitespace, punctuation, common words",
            elem_id="content-only",
        )
    with gr.Row():
        attribute_at = gr.Textbox(
            "",
            label="Attribute the prediction of token N to every earlier token, through the memory",
            placeholder="a token's position (empty: the FAM reads)",
            elem_id="attribute-at",
            scale=3,
        )
        attribute_button = gr.Button("Attribute", elem_id="attribute", scale=1)
    attribution_note = gr.Markdown("", elem_id="attribution-note")
    return slot, content, attribute_at, attribute_button, attribution_note


def _view_controls(n_layers: int, blank: object) -> ViewControls:
    """The status line, the view, layer and block choices, and the plots with their notes."""
    status = gr.Markdown("Ready: pick a document and press **Start**.", elem_id="status")
    with gr.Row():
        view = gr.Dropdown(
            [(spec.label, key) for key, spec in figures.SHARE_VIEWS.items()],
            value=DEFAULT_VIEW,
            label="Attention share shown",
            elem_id="heatmap-view",
        )
        layer = gr.Dropdown(
            [("mean over layers", MEAN_LAYER)] + [(f"layer {i}", str(i)) for i in range(n_layers)],
            value=MEAN_LAYER,
            label="Layer (document shading, drill-down frame, memory lens)",
            elem_id="layer",
        )
        with gr.Column(min_width=240):
            block = gr.Slider(0, 1, value=0, step=1, label="Drill-down block", interactive=False, elem_id="block")
            follow = gr.Checkbox(True, label="follow the latest block", elem_id="follow")
            token = gr.Textbox(
                "",
                label="Drill-down token",
                placeholder="a token's position (empty: the block's mean)",
                elem_id="token",
            )
    with gr.Row():
        heatmap = gr.Plot(blank, label="Attention share: layer × block (mean over heads)", elem_id="heatmap", scale=3)
        heads = gr.Plot(blank, label="Drill-down: layer × head of the selected block", elem_id="heads", scale=2)
    gr.Markdown(PLOT_NOTES["heatmap"], elem_id="note-heatmap", container=False)
    document = gr.HTML("<div id='famviz-doc'>No document streamed yet.</div>", label="Document", elem_id="document")
    slot, content, attribute_at, attribute_button, attribution_note = _shading_controls()
    lens = gr.Plot(blank, label="Memory lens: FAM slot × block", elem_id="lens")
    gr.Markdown(PLOT_NOTES["lens"], elem_id="note-lens", container=False)
    slots = gr.Plot(blank, label="FAM slots: norm, update, attention received", elem_id="slots")
    gr.Markdown(PLOT_NOTES["slots"], elem_id="note-slots", container=False)
    with gr.Row():
        with gr.Column(scale=1):
            method = gr.Radio(list(TRAJECTORY_METHODS), value="PCA", label="Trajectory projection", elem_id="method")
            trajectory = gr.Plot(blank, label="FAM state trajectory", elem_id="trajectory")
            gr.Markdown(PLOT_NOTES["trajectory"], elem_id="note-trajectory", container=False)
        with gr.Column(scale=1):
            dynamics = gr.Plot(blank, label="FAM norm and update per layer", elem_id="dynamics")
            gr.Markdown(PLOT_NOTES["dynamics"], elem_id="note-dynamics", container=False)
    nll = gr.Plot(blank, label="Next-token loss per block", elem_id="nll")
    gr.Markdown(PLOT_NOTES["nll"], elem_id="note-nll", container=False)
    return ViewControls(
        status=status,
        view=view,
        layer=layer,
        block=block,
        follow=follow,
        token=token,
        heatmap=heatmap,
        heads=heads,
        document=document,
        method=method,
        trajectory=trajectory,
        dynamics=dynamics,
        nll=nll,
        lens=lens,
        slot=slot,
        content=content,
        attribute_at=attribute_at,
        attribute_button=attribute_button,
        attribution_note=attribution_note,
        slots=slots,
    )


def _export_controls() -> ExportControls:
    """Figure export (paper formats where a browser is available, else HTML) and the trace download."""
    static_problem = export.static_export_problem()
    with gr.Group():
        with gr.Row():
            figure_name = gr.Dropdown(
                [(f"{name}: {spec.description}", name) for name, spec in export.FIGURES.items()],
                value="heatmap",
                label="Export figure",
                elem_id="export-figure",
                scale=2,
            )
            export_format = gr.Radio(
                list(export.FORMATS) if static_problem is None else ["html"],
                value="svg" if static_problem is None else "html",
                label="Format",
                elem_id="export-format",
                scale=1,
            )
        with gr.Row():
            export_button = gr.Button("Export figure", elem_id="export")
            trace_button = gr.Button("Download trace (.npz)", elem_id="download-trace")
        file = gr.File(label="Exported file", interactive=False, elem_id="export-file")
        note = gr.Markdown(
            "Exports are publication-styled (fixed size, caption with the run's settings)."
            + (f"\n\n**Note:** {static_problem}" if static_problem else ""),
            elem_id="export-note",
        )
    return ExportControls(figure_name, export_format, export_button, trace_button, file, note)


def build_inspector_tab(context: AppContext) -> None:
    """The live memory inspector: controls, per-block plots, document view, export."""
    n_layers = context.hub.default[0].config.num_hidden_layers
    blank = figures.empty_figure("Press Start to stream a document")
    with gr.Tab("Memory inspector", id="inspector", elem_id="tab-inspector"):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                model_inputs = _model_panel(context)
                run = _run_controls(context, n_layers)
                with gr.Row():
                    start_button = gr.Button("Start", variant="primary", elem_id="start")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                start_error = gr.Markdown("", elem_id="start-error")
                with gr.Accordion("Replay a trace file (no model needed)", open=False):
                    trace_upload = gr.File(
                        label="Trace (.npz from Download trace or `famviz stream --trace`)",
                        file_types=[".npz"],
                        type="filepath",
                        elem_id="trace-upload",
                    )
            with gr.Column(scale=3):
                views = _view_controls(n_layers, blank)
                exports = _export_controls()
        umap_timer = gr.Timer(1.0, active=False)

    def start(*args: object) -> Iterator[InspectorViews]:
        yield from stream_document(context.hub, *args, redraw_seconds=context.redraw_seconds)

    run_state = context.run_state
    v = views
    outputs = list(
        InspectorViews(
            v.status,
            v.heatmap,
            v.heads,
            v.document,
            v.trajectory,
            v.dynamics,
            v.nll,
            v.lens,
            v.slots,
            v.block,
            v.layer,
            v.view,
            run_state,
        )
    )
    run_event = start_button.click(
        start,
        [*model_inputs, *run.inputs(), run_state],
        outputs,
        api_name="stream",
        show_progress="hidden",
        concurrency_id="model",
        concurrency_limit=1,
    )
    context.refresh_header_after(run_event)
    # In the browser (no server round trip per block): the status's error part, or nothing.
    v.status.change(None, [v.status], [start_error], js=ERROR_BESIDE_START_JS)
    # While streaming with UMAP chosen, the timer picks up background fits as they finish.
    run_event.then(lambda run: gr.Timer(active=run is not None and run.method == "UMAP"), [run_state], [umap_timer])
    stop_button.click(
        stop_run, [run_state], outputs, cancels=[run_event], api_name="stop", show_progress="hidden"
    ).then(settled_status, [run_state], [v.status], show_progress="hidden")
    trace_upload.upload(replay_trace, [trace_upload, run_state], outputs, api_name="replay", show_progress="hidden")
    _wire_views(v, run_state, umap_timer)
    _wire_exports(exports, run_state)
    v.attribute_button.click(
        lambda position, run: attribute_prediction(context.hub, position, run),
        [v.attribute_at, run_state],
        [v.document, v.attribution_note, v.block, v.follow],
        api_name="attribute",
        concurrency_id="model",
        concurrency_limit=1,
    )


def _wire_views(v: ViewControls, run_state: gr.State, umap_timer: gr.Timer) -> None:
    """The view controls act on the session's run only (no model)."""
    drill_down = [v.heatmap, v.heads, v.document, v.lens, v.follow]
    v.view.change(change_view, [v.view, run_state], [v.heatmap, v.heads], api_name="view", show_progress="hidden")
    v.layer.input(
        change_layer,
        [v.layer, run_state],
        [v.heads, v.document, v.lens, v.slots],
        api_name="layer",
        show_progress="hidden",
    )
    v.slot.input(change_slot, [v.slot, run_state], [v.document, v.slot], api_name="slot", show_progress="hidden")
    v.token.input(change_token, [v.token, run_state], [v.heads], api_name="token", show_progress="hidden")
    v.content.input(change_content, [v.content, run_state], [v.document], api_name="content", show_progress="hidden")
    v.block.release(drag_block, [v.block, run_state], drill_down, api_name="block", show_progress="hidden")
    v.follow.input(select_block, [v.block, v.follow, run_state], drill_down, show_progress="hidden")
    v.method.change(
        change_method, [v.method, run_state], [v.trajectory, umap_timer], api_name="method", show_progress="hidden"
    )
    umap_timer.tick(poll_umap, [run_state], [v.trajectory, umap_timer], show_progress="hidden")


def _wire_exports(exports: ExportControls, run_state: gr.State) -> None:
    exports.export_button.click(
        export_plot,
        [exports.figure_name, exports.export_format, run_state],
        [exports.file, exports.note],
        api_name="export",
        concurrency_id="export",
        concurrency_limit=1,
    )
    exports.trace_button.click(download_trace, [run_state], [exports.file, exports.note], api_name="download_trace")

"""famviz app: the live memory inspector. Stream a document through TransformerFAM and watch its
working memory, block by block; export any plot for a paper.

    python app.py [--model ID_OR_PATH] [--adapter DIR] [--device auto|cpu|cuda]
                  [--dtype auto|bfloat16|float32] [--host 127.0.0.1] [--port 7860]

The model given here (the bundled SmolLM2-135M by default) is loaded at startup; the Model panel
can switch to another supported model or adapter (loaded on the next Start). Pick a mode and
block geometry, give a document (upload, paste, or a built-in example) and press Start: after
every block the plots update. Stop keeps what was computed so far. A run downloads as a trace
file, and an uploaded trace replays every view without a model.

``build_app(loaded)`` builds the UI around an already loaded model (tests use a tiny random one);
the UI is a set of tabs, each built by one ``build_*_tab(context)`` call in ``build_app``.
"""
from __future__ import annotations

import os

# Before gradio is imported: no usage statistics leave this machine; hub ids resolve offline.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from famviz.app.passkey_tab import build_passkey_tab  # noqa: E402
from famviz.core.config import LIMITS, MODES, TOOL_DEFAULTS, FamConfig  # noqa: E402
from famviz.core.engine import Stream  # noqa: E402
from famviz.core.tokenize import tokenize_prefix  # noqa: E402
from famviz.core.trace import Trace  # noqa: E402
from famviz.errors import DocumentError, FamvizError  # noqa: E402
from famviz.io.adapters import SHIPPED_ADAPTER, SHIPPED_ADAPTERS, run_notes  # noqa: E402
from famviz.io.documents import MAX_DOCUMENT_BYTES, SUPPORTED_SUFFIXES, head_bytes_for, read_document, read_upload_start  # noqa: E402
from famviz.io.models import LoadedModel  # noqa: E402
from famviz.viz import export, figures  # noqa: E402
from famviz.viz.inspector import (  # noqa: E402
    DEFAULT_VIEW,
    TRAJECTORY_METHODS,
    Run,
    StateFeatures,
    app_channels,
    default_trajectory_layers,
    parse_layers,
)

log = logging.getLogger("famviz.app")

EXAMPLE_PATH = Path("/usr/share/common-licenses/GPL-3")
SOURCES = {"example": "Example: GPL-3 licence", "passkey": "Example: PassKey haystack", "upload": "Upload a file",
           "paste": "Paste text"}
DEFAULT_SETTINGS = TOOL_DEFAULTS
DEFAULT_MAX_TOKENS = 8192  # a whole typical document (GPL-3 is 7,658 tokens)
DEFAULT_PASSKEY_TOKENS = 2000
MAX_BLOCK_SIZE = LIMITS["block_size"][1]
MAX_FAM_LEN = LIMITS["fam_len"][1]
MAX_MEM_BLOCKS = LIMITS["mem_blocks"][1]
MAX_TOKENS_LIMIT = LIMITS["max_tokens"][1]
MAX_UPLOAD = "512mb"  # what the server accepts; documents are then held to MAX_DOCUMENT_BYTES with a message
MAX_TRACE_BYTES = 512 * 1024 ** 2
# While streaming, plots are redrawn at most this often; blocks that come faster update only the status
# line (every block still sends one update). Redrawing every plot costs a browser ~0.2 s on a desktop
# and 2-3 s on a busy 2-core machine; redraws sent faster than that queue up and freeze the page.
MIN_REDRAW_SECONDS = 2.0
NO_COMPARE = "off"
MEAN_LAYER = "mean"


# -- models and adapters --------------------------------------------------------------------------------
@dataclass
class AppAdapter:
    """A trained adapter, applied once when its model is loaded (LoRA merged); its FAM prompt is
    used in fam mode."""

    adapter: object  # famviz.io.adapters.Adapter
    fam_prompt: torch.Tensor | None

    @property
    def directory(self) -> Path:
        return self.adapter.directory

    def settings(self) -> FamConfig:
        """The FAM geometry the adapter was trained with (the app's defaults when it is loaded)."""
        return self.adapter.trained_config()

    def prompt_for(self, loaded: LoadedModel, config: FamConfig) -> torch.Tensor | None:
        """The FAM prompt for a run, or an AdapterError when the run's settings don't fit the adapter."""
        from famviz.io.adapters import check_compatible

        check_compatible(self.adapter, loaded, config)
        return self.fam_prompt if config.mode == "fam" else None


def attach_adapter(loaded: LoadedModel, directory: str | Path) -> AppAdapter:
    """Read an adapter directory and merge its LoRA weights into ``loaded`` (in place, once)."""
    from famviz.io.adapters import apply_adapter, read_adapter

    adapter = read_adapter(directory)
    probe = AppAdapter(adapter, None)
    prompt = apply_adapter(directory, loaded, dataclasses.replace(probe.settings(), mode="fam"))
    return AppAdapter(adapter, prompt)


def shipped_adapters() -> list[tuple[str, str]]:
    """(label, directory) of the adapters that come with famviz (trained with `famviz train`)."""
    found = []
    markers = sorted(SHIPPED_ADAPTERS.glob("*/famviz_adapter.json"), key=lambda m: (m.parent != SHIPPED_ADAPTER, m))
    for marker in markers:  # the default adapter first
        found.append((f"bundled model + tuned FAM: {marker.parent.name} (see its TRAINING_CARD.md)",
                      str(marker.parent)))
    return found


def _model_key(model, adapter, device, dtype) -> tuple:
    clean = lambda value: (str(value).strip() or None) if value is not None else None  # noqa: E731
    return clean(model), clean(adapter), device or "auto", dtype or "auto"


class ModelHub:
    """The models the app can stream with: the startup one, plus at most one other picked in the UI
    (loaded on Start, inside the queued stream event, so sessions never load concurrently)."""

    def __init__(self, loaded: LoadedModel, adapter: AppAdapter | None, key: tuple):
        self.default_key = key
        self._models: dict[tuple, tuple[LoadedModel, AppAdapter | None]] = {key: (loaded, adapter)}
        self._lock = threading.Lock()

    @property
    def default(self) -> tuple[LoadedModel, AppAdapter | None]:
        return self._models[self.default_key]

    def is_loaded(self, key: tuple) -> bool:
        return key in self._models

    def loaded_choice(self, model, adapter, device, dtype) -> tuple[LoadedModel, AppAdapter | None] | None:
        """The Model panel's choice if it is loaded already (None: it loads on the next Start)."""
        key = _model_key(model, adapter, device, dtype)
        return self._models.get(key)

    def for_choice(self, model, adapter, device, dtype) -> tuple[LoadedModel, AppAdapter | None]:
        """The Model panel's choice: the startup model when it is the one chosen, else loaded by ``get``."""
        key = _model_key(model, adapter, device, dtype)
        return self.default if key == self.default_key else self.get(*key)

    def get(self, model, adapter, device, dtype) -> tuple[LoadedModel, AppAdapter | None]:
        key = _model_key(model, adapter, device, dtype)
        with self._lock:
            if key in self._models:
                return self._models[key]
            from famviz.io.models import load_model

            loaded = load_model(key[0], device=key[2], dtype=key[3])
            app_adapter = attach_adapter(loaded, key[1]) if key[1] else None
            for other in [k for k in self._models if k != self.default_key]:
                del self._models[other]  # keep memory bounded: one extra model at a time
            self._models[key] = (loaded, app_adapter)
            return loaded, app_adapter


# -- one run's inputs ------------------------------------------------------------------------------------
def _whole_number(label: str, value, low: int, high: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FamvizError(f"{label} is empty; enter a whole number from {low} to {high:,}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FamvizError(f"{label} must be a whole number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number):
        raise FamvizError(f"{label} must be a whole number, got {value!r}.")
    if not low <= number <= high:
        raise FamvizError(f"{label} must be from {low} to {high:,}, got {int(number):,}.")
    return int(number)


def parse_settings(mode, block_size, fam_len, mem_blocks, max_tokens) -> tuple[FamConfig, int]:
    """The run's FamConfig and token limit from the form, or a FamvizError with one clear message."""
    if mode not in MODES:
        raise FamvizError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "fam":
        fam_slots = _whole_number("FAM length", fam_len, 1, MAX_FAM_LEN)
    else:  # unused outside fam mode: whatever is in the box must not stop a bswa/full run
        try:
            fam_slots = _whole_number("FAM length", fam_len, 0, MAX_FAM_LEN)
        except FamvizError:
            fam_slots = DEFAULT_SETTINGS.fam_len
    config = FamConfig(
        mode=mode,
        block_size=_whole_number("Block size", block_size, 1, MAX_BLOCK_SIZE),
        fam_len=fam_slots,
        mem_blocks=_whole_number("Memory blocks", mem_blocks, 0, MAX_MEM_BLOCKS),
    )
    return config, _whole_number("Max tokens", max_tokens, 1, MAX_TOKENS_LIMIT)


def document_cut(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]],
                 count_up_to: int = 2_000_000) -> str | None:
    """None when ``ids`` cover the whole document; else how much it holds: "of 7,658 tokens" (counted for
    documents up to ``count_up_to`` characters), or the share of its characters streamed for larger ones."""
    if not offsets or offsets[-1][1] >= len(text.rstrip()):
        return None
    if len(text) <= count_up_to:
        return f"of {len(tokenizer(text, add_special_tokens=False)['input_ids']):,} tokens"
    return f"{offsets[-1][1] / len(text):.0%} of its {len(text):,} characters"


def passkey_text(tokenizer, length) -> str:
    """The PassKey haystack example (key at the start: the memory must carry it to the question)."""
    try:
        from famviz.probes.passkey import make_passkey_document
    except ImportError:
        raise FamvizError("The PassKey example is not available in this famviz version; use the GPL-3 example.") \
            from None
    tokens = _whole_number("PassKey length", length, 64, MAX_TOKENS_LIMIT)
    return make_passkey_document(tokenizer, tokens, depth=0.0, seed=0).text


class InputDocument(NamedTuple):
    text: str
    name: str
    read_cut: str | None = None  # only the start of a large file was read, e.g. "the first 0.5 MB of a 60.0 MB file"


def read_input_document(source: str, upload: str | None, pasted: str | None, tokenizer=None,
                        passkey_tokens=DEFAULT_PASSKEY_TOKENS, max_tokens: int | None = None) -> InputDocument:
    """The chosen document, or a DocumentError/FamvizError saying what is wrong. An upload over the size
    limit is read only as far as ``max_tokens`` can need (plain text only)."""
    if source == "upload":
        if not upload:
            raise FamvizError("No file uploaded: choose a file, or pick pasted text or an example.")
        start, name = read_upload_start(upload, MAX_DOCUMENT_BYTES, head_bytes_for(max_tokens))
        return InputDocument(start.text, name, start.cut)
    if source == "paste":
        if not pasted or not pasted.strip():
            raise FamvizError("No text pasted: paste some text, or pick a file or an example.")
        return InputDocument(pasted.replace("\r\n", "\n").replace("\r", "\n"), "pasted text")
    if source == "example":
        if not EXAMPLE_PATH.is_file():
            raise DocumentError(f"The example document {EXAMPLE_PATH} is not on this machine; "
                                f"upload a file or paste text instead.")
        return InputDocument(read_document(EXAMPLE_PATH, name=EXAMPLE_PATH.name), "GPL-3 licence")
    if source == "passkey":
        if tokenizer is None:
            raise FamvizError("The PassKey example needs the model's tokenizer.")
        return InputDocument(passkey_text(tokenizer, passkey_tokens),
                             f"PassKey haystack ({int(float(passkey_tokens)):,} tokens)")
    raise FamvizError(f"Unknown document source {source!r}; use one of {', '.join(SOURCES)}.")


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
}


ERROR_MARK = "**Error:**"
# The error part of the status, repeated beside Start (the status line sits far above it).
ERROR_BESIDE_START_JS = f"(status) => {{ const at = (status || '').indexOf('{ERROR_MARK}'); " \
                        f"return at < 0 ? '' : status.slice(at); }}"


# -- what every update sends -----------------------------------------------------------------------------
# Outputs of a full refresh, in this order: status, heatmap, heads, document, trajectory, dynamics, nll,
# block slider, layer dropdown, run state.
N_OUTPUTS = 10


def error_status(message: str) -> str:
    return f"{ERROR_MARK} {message}"


def _skips(n: int) -> list:
    return [gr.skip() for _ in range(n)]


def _layer_choices(run: Run) -> list:
    n_layers = int(run.trace.meta.get("n_layers", 0)) if run.trace is not None else 0
    return [("mean over layers", MEAN_LAYER)] + [(f"layer {i}", str(i)) for i in range(n_layers)]


def refresh(run: Run, *, layer_choices: bool = False) -> tuple:
    """Every view of ``run`` (one tuple per update: N_OUTPUTS items)."""
    last = max(run.blocks_done - 1, 0)
    slider = gr.update(maximum=max(last, 1), value=run.shown_block, interactive=run.blocks_done > 1)
    layer = gr.update(choices=_layer_choices(run), value=MEAN_LAYER if run.layer is None else str(run.layer)) \
        if layer_choices else gr.skip()
    return (run.status(), run.heatmap(), run.heads(), run.document_html(), run.trajectory(), run.dynamics(),
            run.loss(), slider, layer, run)


def stream_document(hub: ModelHub, model, adapter_dir, device, dtype, source, upload, pasted, passkey_tokens,
                    mode, compare, block_size, fam_len, mem_blocks, max_tokens, trajectory_layers,
                    previous: Run | None) -> Iterator[tuple]:
    """The Start handler: yields a full refresh once per block.

    Bad input yields one error status and leaves the plots (and the previous run) as they were.
    """
    key = _model_key(model, adapter_dir, device, dtype)
    try:
        config, limit = parse_settings(mode, block_size, fam_len, mem_blocks, max_tokens)
        compare = None if compare in (None, "", NO_COMPARE) else compare
        if compare is not None and compare not in MODES:
            raise FamvizError(f"compare mode must be one of {', '.join(MODES)} or {NO_COMPARE}, got {compare!r}.")
        if compare == config.mode:
            raise FamvizError(f"Compare needs a second mode different from {config.mode}.")
        if not hub.is_loaded(key):
            yield (f"Loading model **{key[0] or 'bundled'}**{' with adapter ' + key[1] if key[1] else ''}…",
                   *_skips(N_OUTPUTS - 1))
        loaded, adapter = hub.for_choice(*key)
        text, name, read_cut = read_input_document(source, upload, pasted, loaded.tokenizer, passkey_tokens, limit)
        n_layers = loaded.config.num_hidden_layers
        try:
            layers = parse_layers(trajectory_layers, n_layers) if config.mode == "fam" else []
        except ValueError as exc:
            raise FamvizError(str(exc)) from None
        fam_prompt = adapter.prompt_for(loaded, config) if adapter is not None else None
        ids, offsets = tokenize_prefix(loaded.tokenizer, text, limit)
        if not ids:
            raise DocumentError(f"{name}: the document has no tokens.")
        primary = Stream(loaded, config, channels=app_channels(layers, config.mode == "fam"), fam_prompt=fam_prompt)
        other = None
        if compare is not None:
            other_config = dataclasses.replace(config, mode=compare)
            other_prompt = adapter.prompt_for(loaded, other_config) if adapter is not None else None
            other = Stream(loaded, other_config, record=False, fam_prompt=other_prompt)
    except FamvizError as exc:
        yield error_status(str(exc)), *_skips(N_OUTPUTS - 1)
        return
    except Exception as exc:  # noqa: BLE001 - the app must survive anything; details go to the log
        log.exception("could not start a stream")
        yield error_status(f"could not start: {type(exc).__name__}: {exc}"), *_skips(N_OUTPUTS - 1)
        return

    trace = primary.trace
    trace.text, trace.offsets = text, list(offsets)
    trace.meta["document"] = name
    notes = run_notes(config, adapter.adapter if adapter is not None else None)
    trace.meta["notes"] = notes
    run = Run(config=config, document=name, total_tokens=len(ids), trace=trace, compare_mode=compare,
              document_cut=read_cut or document_cut(loaded.tokenizer, text, ids, offsets),
              features=StateFeatures(layers) if layers else None, notes=notes)
    if previous is not None:  # keep what the user was looking at
        run.view, run.method = previous.view, previous.method
        run.layer = previous.layer if previous.layer is not None and previous.layer < n_layers else None
    if other is not None:
        other.on_block = lambda block: run.record_compare(block.nll)
    yield run.status(), *_skips(N_OUTPUTS - 2), run  # the run is the session's from now on (Stop acts on it)

    block = config.block_size
    last_redraw = 0.0
    log.info("streaming %s: %d tokens, %d blocks, %s%s", name, len(ids), run.total_blocks, config,
             f" vs {compare}" if compare else "")
    for start in range(0, len(ids), block):
        if run.state != "streaming":  # stopped from the UI: the event is being cancelled
            return
        chunk = ids[start:start + block]
        last = start + block >= len(ids)
        try:
            began = time.perf_counter()
            for stream in (primary, other):
                if stream is not None:
                    stream.feed(chunk)
                    if last:
                        stream.finish()
            run.engine_seconds += time.perf_counter() - began
            if config.mode == "fam":
                run.record_fam_states(primary.state.fam)
        except Exception as exc:  # noqa: BLE001 - keep what was computed; say what went wrong
            log.exception("stream failed at block %d", run.blocks_done)
            run.state, run.error = "failed", f"{type(exc).__name__}: {exc}"
            run.elapsed = time.perf_counter() - run.started
            yield run.status(), *_skips(N_OUTPUTS - 2), run
            return
        run.blocks_done += 1
        run.tokens_done = primary.position
        run.elapsed = time.perf_counter() - run.started
        if run.blocks_done == run.total_blocks:
            run.state = "done"
        if run.state == "done" or run.blocks_done == 1 or time.perf_counter() - last_redraw >= MIN_REDRAW_SECONDS:
            yield refresh(run, layer_choices=run.blocks_done == 1)
            last_redraw = time.perf_counter()
        else:
            yield run.status(), *_skips(N_OUTPUTS - 2), run
    log.info("done: %s (engine %.1f s of %.1f s)", run.status().replace("**", ""), run.engine_seconds, run.elapsed)


def stop_run(run: Run | None):
    """The Stop handler (runs beside the cancelled stream): every view as of the last finished block."""
    if run is None or run.state != "streaming":
        return (gr.skip(),) * N_OUTPUTS
    run.state = "stopped"
    run.elapsed = time.perf_counter() - run.started
    try:
        return refresh(run)
    except Exception:  # noqa: BLE001 - a block was being appended right now: the status is enough
        log.debug("stop: views skipped", exc_info=True)
        return run.status(), *_skips(N_OUTPUTS - 1)


def settled_status(run: Run | None):
    """After Stop has finished: the run's status once more. A block update the cancelled stream had already
    sent can reach the page after Stop's own reply and would leave "Streaming" showing for good."""
    if run is None or run.state == "streaming":
        return gr.skip()
    return run.status()


# -- view controls (no model; each acts on the session's run only) ----------------------------------------------
def _view_handler(n_outputs: int):
    """View handlers may run while the session's stream appends a block to the same trace; a figure
    caught half-way is skipped (the stream's next update redraws it) instead of raising in the UI."""
    def wrap(handler):
        def safe(*args):
            try:
                return handler(*args)
            except Exception:  # noqa: BLE001
                log.debug("view update skipped", exc_info=True)
                return tuple(gr.skip() for _ in range(n_outputs))
        safe.__name__, safe.__doc__, safe.__wrapped__ = handler.__name__, handler.__doc__, handler
        return safe
    return wrap


@_view_handler(2)
def change_view(view: str, run: Run | None):
    """Switch the heatmap target; a running stream picks the new view up at its next block."""
    if view not in figures.SHARE_VIEWS or run is None:
        return gr.skip(), gr.skip()
    run.view = view
    if not run.has_blocks():
        return gr.skip(), gr.skip()
    return run.heatmap(), run.heads()


@_view_handler(2)
def change_layer(layer, run: Run | None):
    """The layer the document is shaded by (and framed in the drill-down)."""
    if run is None:
        return gr.skip(), gr.skip()
    run.layer = None if layer in (None, "", MEAN_LAYER) else int(layer)
    if not run.has_blocks():
        return gr.skip(), gr.skip()
    return run.heads(), run.document_html()


@_view_handler(4)
def select_block(block, follow: bool, run: Run | None):
    """Drill down into one block, or follow the latest: heatmap frame, head view, document window."""
    if run is None or not run.has_blocks():
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    run.block = None if follow or block is None else int(block)
    return run.heatmap(), run.heads(), run.document_html(), gr.skip()


@_view_handler(4)
def drag_block(block, run: Run | None):
    """Moving the slider picks that block and stops following (else the next block would move it back)."""
    heatmap, heads, document, _ = select_block.__wrapped__(block, False, run)
    return heatmap, heads, document, False


def change_method(method: str, run: Run | None):
    """PCA now; UMAP starts in the background and the timer shows it when it is ready."""
    if method not in TRAJECTORY_METHODS or run is None:
        return gr.skip(), gr.Timer(active=False)
    run.method = method
    if not run.has_blocks():
        return gr.skip(), gr.Timer(active=False)
    figure = run.trajectory()
    return figure, gr.Timer(active=run.umap_pending())


def poll_umap(run: Run | None):
    """Timer tick while a UMAP fit runs: show it once done, then stop ticking."""
    if run is None or run.method != "UMAP":
        return gr.skip(), gr.Timer(active=False)
    if run.umap_pending():
        return gr.skip(), gr.skip()
    return run.trajectory(), gr.Timer(active=run.umap_pending() or run.state == "streaming")


# -- export, trace download and replay ----------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40] or "run"


def export_plot(name: str, fmt: str, run: Run | None):
    """Write one figure of the session's run in a paper-ready format; returns (file, note)."""
    if run is None or not run.has_blocks():
        return gr.skip(), "Nothing to export yet: stream a document or replay a trace first."
    path = export.download_dir() / f"famviz-{name}-{_slug(run.document)}.{fmt}"
    file, note = export.export_for_download(lambda: export.export_run_figure(run, name, fmt, path))
    return file or gr.skip(), note


def download_trace(run: Run | None):
    """The whole run as an engine trace file (.npz) that the app and `famviz export` can replay."""
    if run is None or run.trace is None or run.trace.n_blocks == 0:
        return gr.skip(), "No run to download yet."
    try:
        path = run.trace.save(export.download_dir() / f"famviz-trace-{_slug(run.document)}.npz")
    except OSError as exc:
        return gr.skip(), error_status(f"cannot write the trace: {exc.strerror or exc}")
    return str(path), f"Trace **{path.name}** ({path.stat().st_size / 1024 ** 2:,.1f} MB): {run.blocks_done} blocks."


def replay_trace(upload: str | None, previous: Run | None):
    """Load an uploaded trace file and show every view of it, without a model."""
    if not upload:
        return (gr.skip(),) * N_OUTPUTS
    path = Path(upload)
    try:
        if path.stat().st_size > MAX_TRACE_BYTES:
            raise FamvizError(f"{path.name} is larger than the {MAX_TRACE_BYTES // 1024 ** 2} MB limit for traces.")
        trace = Trace.load(path)
        if trace.n_blocks == 0:
            raise FamvizError(f"{path.name} holds no blocks.")
        run = Run.from_trace(trace, name=path.name)
    except FamvizError as exc:
        return error_status(str(exc)), *_skips(N_OUTPUTS - 1)
    except Exception as exc:  # noqa: BLE001
        log.exception("replay failed")
        return error_status(f"cannot replay {path.name}: {type(exc).__name__}: {exc}"), *_skips(N_OUTPUTS - 1)
    if previous is not None:
        run.view, run.method = previous.view, previous.method
    return refresh(run, layer_choices=True)


# -- the UI ------------------------------------------------------------------------------------------------------
@dataclass
class AppContext:
    """What every tab can use: the models, and the session's current run (gr.State)."""

    hub: ModelHub
    run_state: gr.State
    defaults: FamConfig
    model_inputs: list = dataclasses.field(default_factory=list)  # the Model panel: model, adapter, device, dtype
    header: object = None  # the page's model line (gr.Markdown), redrawn when the choice changes or a run ends
    adapter_note: object = None  # under the adapter choice: the geometry it applied
    geometry_fields: list = dataclasses.field(default_factory=list)  # per tab: (block size, FAM length, memory blocks)

    def refresh_header_after(self, event) -> None:
        """After ``event`` (a run of either tab), the header names the model that ran."""
        event.then(lambda *choice: model_header(self.hub, *choice), self.model_inputs, self.header,
                   show_progress="hidden")


def _model_summary(loaded: LoadedModel, adapter: AppAdapter | None) -> str:
    cfg = loaded.config
    dtype = str(loaded.dtype).replace("torch.", "")
    line = (f"**Model:** {loaded.name} · {cfg.num_hidden_layers} layers · {cfg.num_attention_heads} heads · "
            f"{loaded.device} · {dtype}")
    if adapter is not None:
        line += f" · adapter `{Path(str(adapter.directory)).name}` (tuned FAM)"
    else:
        line += (" · untuned conversion: the FAM is the model's own layers run on a fixed prompt, never trained "
                 "to remember, so expect its loss to rise over a long document (choose a tuned adapter in the "
                 "Model panel)")
    return line


def model_header(hub: ModelHub, model, adapter, device, dtype) -> str:
    """The page's model line for the Model panel's choice: the loaded model's summary, or what loads next."""
    choice = hub.loaded_choice(model, adapter, device, dtype)
    if choice is not None:
        return _model_summary(*choice)
    name = (model or "").strip() or "bundled SmolLM2-135M"
    adapter = (adapter or "").strip()
    return (f"**Model (chosen, loaded on the next Start):** {name}"
            + (f" · adapter `{Path(adapter).name}`" if adapter else " · untuned conversion"))


def adapter_geometry(groups: int, directory):
    """The adapter choice: its trained geometry goes into every tab's block size, FAM length and memory
    blocks (``groups`` tabs), and the note under the choice says so."""
    directory = (directory or "").strip()
    keep = [gr.skip()] * (3 * groups)
    if not directory:
        return *keep, ("Untuned conversion: the FAM is the model's own layers run on a fixed prompt, never "
                       "trained to remember; expect its loss to rise over a long document.")
    try:
        from famviz.io.adapters import read_adapter

        trained = AppAdapter(read_adapter(directory), None).settings()
    except FamvizError as exc:
        return *keep, error_status(str(exc))
    values = [trained.block_size, trained.fam_len, trained.mem_blocks] * groups
    return *values, (f"Adapter `{Path(directory).name}` was trained with block {trained.block_size} tokens, "
                     f"FAM {trained.fam_len} slots, memory blocks {trained.mem_blocks}: these settings are now "
                     f"set in every tab. Other settings are allowed; the status then says how a run differs.")


def build_inspector_tab(context: AppContext) -> None:
    """The live memory inspector: controls, per-block plots, document view, export."""
    hub, run_state, defaults = context.hub, context.run_state, context.defaults
    loaded, adapter = hub.default
    n_layers = loaded.config.num_hidden_layers
    blank = figures.empty_figure("Press Start to stream a document")
    view_choices = [(spec.label, key) for key, spec in figures.SHARE_VIEWS.items()]
    static_problem = export.static_export_problem()
    model_key = hub.default_key

    with gr.Tab("Memory inspector", id="inspector", elem_id="tab-inspector"):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Accordion("Model", open=False, elem_id="model-panel"):
                    model = gr.Textbox(model_key[0] or "", label="Model (Hugging Face id or local path)",
                                       placeholder="empty: bundled SmolLM2-135M", elem_id="model")
                    adapter_dir = gr.Dropdown([("none: untuned conversion (memory not trained)", ""),
                                               *shipped_adapters()], value=model_key[1] or "",
                                              allow_custom_value=True, label="Adapter (or type a directory)",
                                              elem_id="adapter")
                    with gr.Row():
                        device = gr.Dropdown(["auto", "cpu", "cuda"], value=model_key[2], label="Device",
                                             elem_id="device")
                        dtype = gr.Dropdown(["auto", "bfloat16", "float32"], value=model_key[3], label="Dtype",
                                            elem_id="dtype")
                    context.adapter_note = gr.Markdown("", elem_id="adapter-note")
                    gr.Markdown("A changed model is loaded when you press Start (here or in the PassKey tab).")
                    context.model_inputs[:] = [model, adapter_dir, device, dtype]
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=defaults.mode, label="Mode", elem_id="mode",
                                    info="fam: window + feedback memory · bswa: window only · sink: window + the first 4 tokens "
                                         "(StreamingLLM) · full: all tokens")
                    compare = gr.Dropdown([NO_COMPARE, *MODES], value=NO_COMPARE, label="Compare with",
                                          elem_id="compare", info="same document, second mode")
                with gr.Row():
                    block_size = gr.Number(defaults.block_size, label="Block size (tokens)", precision=None, step=1,
                                           elem_id="block-size")
                    fam_len = gr.Number(defaults.fam_len, label="FAM length (slots)", precision=None, step=1,
                                        elem_id="fam-len")
                with gr.Row():
                    mem_blocks = gr.Number(defaults.mem_blocks, label="Memory blocks", precision=None, step=1,
                                           elem_id="mem-blocks")
                    max_tokens = gr.Number(DEFAULT_MAX_TOKENS, label="Max tokens", precision=None, step=1, elem_id="max-tokens")
                context.geometry_fields.append((block_size, fam_len, mem_blocks))
                trajectory_layers = gr.Textbox(", ".join(map(str, default_trajectory_layers(n_layers))),
                                               label="Trajectory layers (FAM states recorded)",
                                               elem_id="trajectory-layers")
                source = gr.Radio([(label, key) for key, label in SOURCES.items()], value="example", label="Document",
                                  elem_id="source")
                passkey_tokens = gr.Number(DEFAULT_PASSKEY_TOKENS, label="PassKey haystack length (tokens; key at "
                                           "the start)", precision=0, elem_id="passkey-tokens")
                upload = gr.File(label=f"Upload (.txt .md .pdf .html, ≤ {MAX_DOCUMENT_BYTES // 1024 ** 2} MB)",
                                 file_types=list(SUPPORTED_SUFFIXES), type="filepath", elem_id="upload")
                pasted = gr.Textbox(label="Or paste text", lines=4, max_lines=10, placeholder="Paste a document here",
                                    elem_id="pasted")
                with gr.Row():
                    start_button = gr.Button("Start", variant="primary", elem_id="start")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                start_error = gr.Markdown("", elem_id="start-error")
                with gr.Accordion("Replay a trace file (no model needed)", open=False):
                    trace_upload = gr.File(label="Trace (.npz from Download trace or `famviz stream --trace`)",
                                           file_types=[".npz"], type="filepath", elem_id="trace-upload")
            with gr.Column(scale=3):
                status = gr.Markdown("Ready: pick a document and press **Start**.", elem_id="status")
                with gr.Row():
                    view = gr.Dropdown(view_choices, value=DEFAULT_VIEW, label="Attention share shown",
                                       elem_id="heatmap-view")
                    layer = gr.Dropdown([("mean over layers", MEAN_LAYER)] +
                                        [(f"layer {i}", str(i)) for i in range(n_layers)], value=MEAN_LAYER,
                                        label="Layer (document shading, drill-down frame)", elem_id="layer")
                    with gr.Column(min_width=240):
                        block = gr.Slider(0, 1, value=0, step=1, label="Drill-down block", interactive=False,
                                          elem_id="block")
                        follow = gr.Checkbox(True, label="follow the latest block", elem_id="follow")
                with gr.Row():
                    heatmap = gr.Plot(blank, label="Attention share: layer × block (mean over heads)",
                                      elem_id="heatmap", scale=3)
                    heads = gr.Plot(blank, label="Drill-down: layer × head of the selected block", elem_id="heads",
                                    scale=2)
                gr.Markdown(PLOT_NOTES["heatmap"], elem_id="note-heatmap", container=False)
                document = gr.HTML("<div id='famviz-doc'>No document streamed yet.</div>", label="Document",
                                   elem_id="document")
                with gr.Row():
                    with gr.Column(scale=1):
                        method = gr.Radio(list(TRAJECTORY_METHODS), value="PCA", label="Trajectory projection",
                                          elem_id="method")
                        trajectory = gr.Plot(blank, label="FAM state trajectory", elem_id="trajectory")
                        gr.Markdown(PLOT_NOTES["trajectory"], elem_id="note-trajectory", container=False)
                    with gr.Column(scale=1):
                        dynamics = gr.Plot(blank, label="FAM norm and update per layer", elem_id="dynamics")
                        gr.Markdown(PLOT_NOTES["dynamics"], elem_id="note-dynamics", container=False)
                nll = gr.Plot(blank, label="Next-token loss per block", elem_id="nll")
                gr.Markdown(PLOT_NOTES["nll"], elem_id="note-nll", container=False)
                with gr.Group():
                    with gr.Row():
                        figure_name = gr.Dropdown([(f"{name}: {spec.description}", name)
                                                   for name, spec in export.FIGURES.items()], value="heatmap",
                                                  label="Export figure", elem_id="export-figure", scale=2)
                        formats = list(export.FORMATS) if static_problem is None else ["html"]
                        export_format = gr.Radio(formats, value="svg" if static_problem is None else "html",
                                                 label="Format", elem_id="export-format", scale=1)
                    with gr.Row():
                        export_button = gr.Button("Export figure", elem_id="export")
                        trace_button = gr.Button("Download trace (.npz)", elem_id="download-trace")
                    export_file = gr.File(label="Exported file", interactive=False, elem_id="export-file")
                    export_note = gr.Markdown(
                        "Exports are publication-styled (fixed size, caption with the run's settings)."
                        + (f"\n\n**Note:** {static_problem}" if static_problem else ""), elem_id="export-note")
        umap_timer = gr.Timer(1.0, active=False)

    def start(*args):
        yield from stream_document(hub, *args)

    outputs = [status, heatmap, heads, document, trajectory, dynamics, nll, block, layer, run_state]
    # Picking a file or typing text selects that source (in the browser, no round trip).
    upload.upload(None, None, source, js="() => 'upload'")
    pasted.input(None, None, source, js="() => 'paste'")
    passkey_tokens.input(None, None, source, js="() => 'passkey'")
    run_event = start_button.click(
        start, [model, adapter_dir, device, dtype, source, upload, pasted, passkey_tokens, mode, compare, block_size,
                fam_len, mem_blocks, max_tokens, trajectory_layers, run_state],
        outputs, api_name="stream", show_progress="hidden", concurrency_id="model", concurrency_limit=1,
    )
    context.refresh_header_after(run_event)
    # In the browser (no server round trip per block): the status's error part, or nothing.
    status.change(None, [status], [start_error], js=ERROR_BESIDE_START_JS)
    # While streaming with UMAP chosen, the timer picks up background fits as they finish.
    run_event.then(lambda run: gr.Timer(active=run is not None and run.method == "UMAP"), [run_state], [umap_timer])
    stop_button.click(stop_run, [run_state], outputs, cancels=[run_event], api_name="stop", show_progress="hidden") \
        .then(settled_status, [run_state], [status], show_progress="hidden")
    view.change(change_view, [view, run_state], [heatmap, heads], api_name="view", show_progress="hidden")
    layer.input(change_layer, [layer, run_state], [heads, document], api_name="layer", show_progress="hidden")
    block.release(drag_block, [block, run_state], [heatmap, heads, document, follow], api_name="block",
                  show_progress="hidden")
    follow.input(select_block, [block, follow, run_state], [heatmap, heads, document, follow], show_progress="hidden")
    method.change(change_method, [method, run_state], [trajectory, umap_timer], api_name="method",
                  show_progress="hidden")
    umap_timer.tick(poll_umap, [run_state], [trajectory, umap_timer], show_progress="hidden")
    export_button.click(export_plot, [figure_name, export_format, run_state], [export_file, export_note],
                        api_name="export", concurrency_id="export", concurrency_limit=1)
    trace_button.click(download_trace, [run_state], [export_file, export_note], api_name="download_trace")
    trace_upload.upload(replay_trace, [trace_upload, run_state], outputs, api_name="replay", show_progress="hidden")


def build_app(loaded: LoadedModel, adapter: AppAdapter | str | Path | None = None,
              model_key: tuple | None = None) -> gr.Blocks:
    """The app around a loaded model; ``adapter`` is an AppAdapter or an adapter directory (applied here).
    ``model_key`` = (model, adapter, device, dtype) as given on the command line (for the Model panel)."""
    if adapter is not None and not isinstance(adapter, AppAdapter):
        adapter = attach_adapter(loaded, adapter)
    key = model_key or (None if loaded.name.startswith("SmolLM2") else loaded.name,
                        str(adapter.directory) if adapter is not None else None, "auto", "auto")
    hub = ModelHub(loaded, adapter, key)
    defaults = adapter.settings() if adapter is not None else DEFAULT_SETTINGS

    with gr.Blocks(title="famviz: TransformerFAM memory", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("## famviz · watch TransformerFAM's working memory")
        header = gr.Markdown(_model_summary(loaded, adapter), elem_id="model-summary")
        context = AppContext(hub=hub, run_state=gr.State(None), defaults=defaults, header=header)
        with gr.Tabs():
            build_inspector_tab(context)
            build_passkey_tab(context)
        for choice in context.model_inputs:
            choice.change(lambda *c: model_header(hub, *c), context.model_inputs, header, show_progress="hidden")
        fields = [field for group in context.geometry_fields for field in group]
        context.model_inputs[1].input(functools.partial(adapter_geometry, len(context.geometry_fields)),
                                      [context.model_inputs[1]], [*fields, context.adapter_note],
                                      show_progress="hidden")
    demo.queue(default_concurrency_limit=4)
    demo.famviz_hub, demo.famviz_defaults = hub, defaults  # for warm_up and tests
    return demo


# -- command line -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, metavar="ID_OR_PATH",
                        help="Hugging Face model id or local path (default: bundled SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="trained FAM adapter directory; 'none' for the untuned conversion (default: the "
                             "shipped tuned FAM adapter with the bundled model, none with --model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--redraw-seconds", type=float, default=MIN_REDRAW_SECONDS, metavar="S",
                        help=f"while blocks come faster, redraw the plots at most every S seconds "
                             f"(default {MIN_REDRAW_SECONDS:g}; the status line updates after every block)")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging on stderr")
    return parser


def startup_adapter(model: str | None, adapter: str | None) -> str | None:
    """The adapter the app starts with: the one given ('none': the untuned conversion), else the shipped
    tuned FAM with the bundled model (other models have no shipped adapter)."""
    if adapter is not None:
        return None if adapter.strip().lower() in ("", "none") else adapter
    return str(SHIPPED_ADAPTER) if model is None and (SHIPPED_ADAPTER / "famviz_adapter.json").is_file() else None


def warm_up(hub: ModelHub, defaults: FamConfig) -> float:
    """Stream two short blocks and draw every view once before the page is served, so that one-time costs
    (kernel selection, first allocations, plotly's first figures) never fall on a user's first run and
    nothing warms up in the background while a user streams. Returns the seconds it took."""
    started = time.perf_counter()
    settings = dataclasses.replace(defaults, block_size=min(defaults.block_size, 64))
    text = " ".join(f"Warm-up sentence {i} for the memory inspector." for i in range(40))
    args = [*hub.default_key, "paste", None, text, DEFAULT_PASSKEY_TOKENS, settings.mode, NO_COMPARE,
            settings.block_size, settings.fam_len, settings.mem_blocks, 2 * settings.block_size, "", None]
    for _ in stream_document(hub, *args):
        pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    global MIN_REDRAW_SECONDS
    args = build_parser().parse_args(argv)
    if args.redraw_seconds < 0:
        print("famviz: error: --redraw-seconds must be 0 or more", file=sys.stderr)
        return 2
    MIN_REDRAW_SECONDS = args.redraw_seconds
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.INFO if args.verbose else logging.WARNING)  # gradio's own pings
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    try:
        from famviz.io.models import load_model

        started = time.perf_counter()
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        args.adapter = startup_adapter(args.model, args.adapter)
        adapter = attach_adapter(loaded, args.adapter) if args.adapter else None
        log.info("famviz: %s loaded in %.1f s on %s (%s)", loaded.name, time.perf_counter() - started,
                 loaded.device, str(loaded.dtype).replace("torch.", ""))
        demo = build_app(loaded, adapter, model_key=_model_key(args.model, args.adapter, args.device, args.dtype))
        log.info("famviz: warmed up in %.1f s", warm_up(demo.famviz_hub, demo.famviz_defaults))
    except FamvizError as exc:
        print(f"famviz: error: {exc}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_UPLOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""famviz app: the live memory inspector. Stream a document through TransformerFAM and watch its
working memory, block by block; export any plot for a paper.

    python app.py [--model ID_OR_PATH] [--adapter DIR] ...   # or famviz app ... (famviz.commands.app)

The model given here (the bundled SmolLM2-135M with its tuned FAM adapter by default) is loaded at startup;
the Model panel can switch to another supported model or adapter (loaded on the next Start). Pick a mode and
block geometry, give a document (upload, paste, or a built-in example) and press Start: after every block the
plots update. Stop keeps what was computed so far. A run downloads as a trace file, and an uploaded trace
replays every view without a model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import threading
import time
from pathlib import Path

import gradio as gr

from famviz.app import MIN_REDRAW_SECONDS
from famviz.app.hub import (
    AppAdapter,
    AppContext,
    ModelHub,
    adapter_geometry,
    attach_adapter,
    model_header,
    model_key,
    model_summary,
)
from famviz.app.inputs import DEFAULT_PASSKEY_TOKENS, DEFAULT_SETTINGS, MAX_UPLOAD
from famviz.app.inspector_tab import NO_COMPARE, build_inspector_tab, stream_document
from famviz.app.passkey_tab import build_passkey_tab
from famviz.core.config import FamConfig
from famviz.core.model import LoadedModel
from famviz.errors import FamvizError
from famviz.io.adapters import SHIPPED_ADAPTER

log = logging.getLogger("famviz.app")


def build_app(
    loaded: LoadedModel,
    adapter: AppAdapter | str | Path | None = None,
    startup_key: tuple | None = None,
    redraw_seconds: float = MIN_REDRAW_SECONDS,
) -> gr.Blocks:
    """The app around a loaded model; ``adapter`` is an AppAdapter or an adapter directory (applied here).
    ``startup_key`` = (model, adapter, device, dtype) as given on the command line (for the Model panel)."""
    if adapter is not None and not isinstance(adapter, AppAdapter):
        adapter = attach_adapter(loaded, adapter)
    key = startup_key or (
        None if loaded.name.startswith("SmolLM2") else loaded.name,
        str(adapter.directory) if adapter is not None else None,
        "auto",
        "auto",
    )
    hub = ModelHub(loaded, adapter, key)
    defaults = adapter.settings() if adapter is not None else DEFAULT_SETTINGS

    with gr.Blocks(title="famviz: TransformerFAM memory", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("## famviz · watch TransformerFAM's working memory")
        header = gr.Markdown(model_summary(loaded, adapter), elem_id="model-summary")
        context = AppContext(
            hub=hub, run_state=gr.State(None), defaults=defaults, redraw_seconds=redraw_seconds, header=header
        )
        with gr.Tabs():
            build_inspector_tab(context)
            build_passkey_tab(context)
        for choice in context.model_inputs:
            choice.change(lambda *c: model_header(hub, *c), context.model_inputs, header, show_progress="hidden")
        fields = [field for group in context.geometry_fields for field in group]
        context.model_inputs[1].input(
            functools.partial(adapter_geometry, len(context.geometry_fields)),
            [context.model_inputs[1]],
            [*fields, context.adapter_note],
            show_progress="hidden",
        )
    demo.queue(default_concurrency_limit=4)
    demo.famviz_context = context  # for warm_up, benchmarks and tests
    return demo


def startup_adapter(model: str | None, adapter: str | None) -> str | None:
    """The adapter the app starts with: the one given ('none': the untuned conversion), else the shipped
    tuned FAM with the bundled model (other models have no shipped adapter)."""
    if adapter is not None:
        return None if adapter.strip().lower() in ("", "none") else adapter
    return str(SHIPPED_ADAPTER) if model is None and (SHIPPED_ADAPTER / "famviz_adapter.json").is_file() else None


class _WarmUpQuiet(logging.Filter):
    """Drops famviz's records below WARNING made on one thread: the warm-up's status ("adapter trained with
    block 256, this run uses 64") is about its own run, not the user's; other threads log as usual."""

    def __init__(self, thread_id: int | None):
        super().__init__()
        self.thread_id = thread_id

    def filter(self, record: logging.LogRecord) -> bool:
        mine = record.thread == self.thread_id and record.name.startswith("famviz")
        return not (mine and record.levelno < logging.WARNING)


def warm_up(hub: ModelHub, defaults: FamConfig) -> float:
    """Stream two short blocks and draw every view once, so that one-time costs (kernel selection, first
    allocations, plotly's first figures) never fall on a user's first run; ``main`` runs it while the page
    is served (``ModelHub.warm_up_in_background``: a user's run waits for it). Returns the seconds it took."""
    started = time.perf_counter()
    settings = dataclasses.replace(defaults, block_size=min(defaults.block_size, 64))
    text = " ".join(f"Warm-up sentence {i} for the memory inspector." for i in range(40))
    args = [
        *hub.default_key,
        "paste",
        None,
        text,
        DEFAULT_PASSKEY_TOKENS,
        settings.mode,
        NO_COMPARE,
        settings.block_size,
        settings.fam_len,
        settings.mem_blocks,
        2 * settings.block_size,
        "",
        "",
        False,
        None,
    ]
    quiet = _WarmUpQuiet(threading.get_ident())
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        for _ in stream_document(hub, *args):
            pass
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    return time.perf_counter() - started


def serve(
    model: str | None = None,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    host: str = "127.0.0.1",
    port: int = 7860,
    redraw_seconds: float = MIN_REDRAW_SECONDS,
    started: float | None = None,
) -> int:
    """Load the model (and ``adapter``, the shipped one by default: ``startup_adapter``), build the page and
    serve it until stopped, warming up meanwhile. ``started``: ``time.perf_counter()`` before the launcher
    imported the app (gradio, torch), so the log says what each phase of start-up took. User errors: one
    line on stderr, status 2."""
    started = time.perf_counter() if started is None else started
    logging.getLogger().setLevel(logging.INFO)  # the start-up's phases are shown
    log.info("famviz: starting: libraries imported in %.1f s", time.perf_counter() - started)
    try:
        from famviz.io.models import load_model

        loading = time.perf_counter()
        loaded = load_model(model, device=device, dtype=dtype)
        adapter = startup_adapter(model, adapter)
        attached = attach_adapter(loaded, adapter) if adapter else None
        log.info(
            "famviz: %s loaded in %.1f s on %s (%s)",
            loaded.name,
            time.perf_counter() - loading,
            loaded.device,
            str(loaded.dtype).replace("torch.", ""),
        )
        built = time.perf_counter()
        demo = build_app(
            loaded, attached, startup_key=model_key(model, adapter, device, dtype), redraw_seconds=redraw_seconds
        )
        log.info("famviz: page built in %.1f s", time.perf_counter() - built)
    except FamvizError as exc:
        print(f"famviz: error: {exc}", file=sys.stderr)
        return 2
    context = demo.famviz_context

    def warm_up_and_say_so() -> None:
        seconds = warm_up(context.hub, context.defaults)
        log.info("famviz: warmed up in %.1f s (two short blocks, every view once)", seconds)

    context.hub.warm_up_in_background(warm_up_and_say_so)
    log.info("famviz: serving, %.1f s after start-up began; warming up meanwhile", time.perf_counter() - started)
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_UPLOAD)
    return 0

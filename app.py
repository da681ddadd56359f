"""famviz app: stream a document through TransformerFAM and watch its memory, block by block.

    python app.py [--model ID_OR_PATH] [--adapter DIR] [--device auto|cpu|cuda]
                  [--dtype auto|bfloat16|float32] [--host 127.0.0.1] [--port 7860]

The model is loaded once at startup (the bundled SmolLM2-135M by default). Pick a mode and block
geometry, give a document (upload, paste, or the built-in example) and press Start: after every
block the plots update with what the engine recorded. Stop keeps what was computed so far.

``build_app(loaded)`` builds the UI around an already loaded model (tests use a tiny random one).
"""
from __future__ import annotations

import os

# Before gradio is imported: no usage statistics leave this machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from famviz import figures  # noqa: E402
from famviz.config import MODES, FamConfig  # noqa: E402
from famviz.documents import MAX_DOCUMENT_BYTES, SUPPORTED_SUFFIXES, read_document_bytes  # noqa: E402
from famviz.engine import Stream  # noqa: E402
from famviz.errors import DocumentError, FamvizError  # noqa: E402
from famviz.models import LoadedModel  # noqa: E402
from famviz.tokenize import tokenize_prefix  # noqa: E402
from famviz.trace import Trace  # noqa: E402

log = logging.getLogger("famviz.app")

EXAMPLE_PATH = Path("/usr/share/common-licenses/GPL-3")
SOURCES = {"example": "Example: GPL-3 licence", "upload": "Upload a file", "paste": "Paste text"}
# What the app records: everything its plots need, nothing per token and layer (fam.read) and no
# FAM states (fam.state is fam_len × hidden per layer and block, megabytes per block).
APP_CHANNELS = ("tokens.nll", "block.*.share", "fam.*.share", "fam.*.norm", "fam.*.update")
DEFAULT_SETTINGS = FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=1)
DEFAULT_MAX_TOKENS = 4096
MAX_BLOCK_SIZE = 8192
MAX_FAM_LEN = 1024
MAX_MEM_BLOCKS = 64
MAX_TOKENS_LIMIT = 1_000_000
DEFAULT_VIEW = "block-fam"


# -- model and adapter --------------------------------------------------------------------------------
@dataclass
class AppAdapter:
    """A trained adapter, applied once at startup (LoRA merged); its FAM prompt is used in fam mode."""

    adapter: object  # famviz.adapters.Adapter
    fam_prompt: torch.Tensor | None

    @property
    def directory(self) -> Path:
        return self.adapter.directory

    def settings(self) -> FamConfig:
        """The FAM geometry the adapter was trained with (the app's defaults when it is loaded)."""
        names = {f.name for f in dataclasses.fields(FamConfig)}
        trained = {k: v for k, v in self.adapter.fam_config.items() if k in names}
        return dataclasses.replace(DEFAULT_SETTINGS, **trained)

    def prompt_for(self, loaded: LoadedModel, config: FamConfig) -> torch.Tensor | None:
        """The FAM prompt for a run, or an AdapterError when the run's settings don't fit the adapter."""
        from famviz.adapters import check_compatible

        check_compatible(self.adapter, loaded, config)
        return self.fam_prompt if config.mode == "fam" else None


def attach_adapter(loaded: LoadedModel, directory: str | Path) -> AppAdapter:
    """Read an adapter directory and merge its LoRA weights into ``loaded`` (in place, once)."""
    from famviz.adapters import apply_adapter, read_adapter

    adapter = read_adapter(directory)
    probe = AppAdapter(adapter, None)
    prompt = apply_adapter(directory, loaded, dataclasses.replace(probe.settings(), mode="fam"))
    return AppAdapter(adapter, prompt)


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


def read_input_document(source: str, upload: str | None, pasted: str | None) -> tuple[str, str]:
    """(text, name) of the chosen document, or a DocumentError/FamvizError saying what is wrong."""
    if source == "upload":
        if not upload:
            raise FamvizError("No file uploaded: choose a file, or pick pasted text or the example.")
        path = Path(upload)
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as exc:
            raise DocumentError(f"{path.name}: cannot read the uploaded file ({exc.strerror or exc}).") from None
        return read_document_bytes(data, path.name), path.name
    if source == "paste":
        if not pasted or not pasted.strip():
            raise FamvizError("No text pasted: paste some text, or pick a file or the example.")
        return pasted.replace("\r\n", "\n").replace("\r", "\n"), "pasted text"
    if source == "example":
        try:
            data = EXAMPLE_PATH.read_bytes()
        except OSError:
            raise DocumentError(f"The example document {EXAMPLE_PATH} is not on this machine; "
                                f"upload a file or paste text instead.") from None
        return read_document_bytes(data, EXAMPLE_PATH.name), "GPL-3 licence"
    raise FamvizError(f"Unknown document source {source!r}; use one of {', '.join(SOURCES)}.")


# -- a run as it streams ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One stream's progress and trace; kept in the session's gr.State so that the view dropdown
    and the Stop button act on the run that is streaming."""

    config: FamConfig
    document: str
    total_tokens: int
    view: str = DEFAULT_VIEW
    trace: Trace | None = None
    blocks_done: int = 0
    tokens_done: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0
    state: str = "streaming"  # streaming | done | stopped | failed
    error: str = ""

    @property
    def total_blocks(self) -> int:
        return -(-self.total_tokens // self.config.block_size)

    def status(self) -> str:
        cfg = self.config
        geometry = f"block {cfg.block_size}, memory blocks {cfg.mem_blocks}" + \
            (f", FAM {cfg.fam_len}" if cfg.mode == "fam" else "")
        speed = self.tokens_done / self.elapsed if self.elapsed > 0 else 0.0
        parts = [f"{self.blocks_done} / {self.total_blocks} blocks",
                 f"{self.tokens_done:,} / {self.total_tokens:,} tokens",
                 f"{speed:,.0f} tokens/s", f"{self.elapsed:.1f} s elapsed"]
        if self.state == "done" and self.trace is not None and "tokens.nll" in self.trace.keys:
            nll = self.trace.array("tokens.nll")
            finite = nll[np.isfinite(nll)]
            if finite.size:
                parts.append(f"mean NLL {finite.mean():.3f} nats")
        head = {"streaming": "Streaming", "done": "Done", "stopped": "Stopped", "failed": "Failed"}[self.state]
        line = f"**{head}** · {self.document} · {cfg.mode} ({geometry}) · " + " · ".join(parts)
        if self.error:
            line += f"\n\n**Error:** {self.error}"
        return line

    def figures(self):
        if self.trace is None or self.trace.n_blocks == 0:
            blank = figures.empty_figure("no blocks yet")
            return blank, blank, blank
        return (figures.view_figure(self.trace, self.view),
                figures.nll_per_block(self.trace.array("tokens.nll"), self.trace.block_starts),
                figures.fam_figure(self.trace))


def error_status(message: str) -> str:
    return f"**Error:** {message}"


def stream_document(loaded: LoadedModel, adapter: AppAdapter | None, source, upload, pasted, mode, block_size,
                    fam_len, mem_blocks, max_tokens, view, previous: Run | None) -> Iterator[tuple]:
    """The Start handler: yields (status, heatmap, nll, fam, run) once per block.

    Bad input yields one error status and leaves the plots (and the previous run) as they were.
    """
    try:
        config, limit = parse_settings(mode, block_size, fam_len, mem_blocks, max_tokens)
        text, name = read_input_document(source, upload, pasted)
        fam_prompt = adapter.prompt_for(loaded, config) if adapter is not None else None
        ids, offsets = tokenize_prefix(loaded.tokenizer, text, limit)
        if not ids:
            raise DocumentError(f"{name}: the document has no tokens.")
        stream = Stream(loaded, config, channels=APP_CHANNELS, fam_prompt=fam_prompt)
    except FamvizError as exc:
        yield error_status(str(exc)), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    except Exception as exc:  # noqa: BLE001 - the app must survive anything; details go to the log
        log.exception("could not start a stream")
        yield error_status(f"could not start: {type(exc).__name__}: {exc}"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return

    stream.trace.text, stream.trace.offsets = text, list(offsets)
    run = Run(config=config, document=name, total_tokens=len(ids), trace=stream.trace,
              view=view if view in figures.SHARE_VIEWS else DEFAULT_VIEW)
    block = config.block_size
    log.info("streaming %s: %d tokens, %d blocks, %s", name, len(ids), run.total_blocks, config)
    for start in range(0, len(ids), block):
        if run.state != "streaming":  # stopped from the UI: the event is being cancelled
            return
        try:
            stream.feed(ids[start:start + block])
            if start + block >= len(ids):
                stream.finish()
        except Exception as exc:  # noqa: BLE001 - keep what was computed; say what went wrong
            log.exception("stream failed at block %d", run.blocks_done)
            run.state, run.error = "failed", f"{type(exc).__name__}: {exc}"
            run.elapsed = time.perf_counter() - run.started
            yield run.status(), gr.skip(), gr.skip(), gr.skip(), run
            return
        run.blocks_done += 1
        run.tokens_done = stream.position
        run.elapsed = time.perf_counter() - run.started
        if run.blocks_done == run.total_blocks:
            run.state = "done"
        heatmap, nll, fam = run.figures()
        yield run.status(), heatmap, nll, fam, run
    log.info("done: %s", run.status().replace("**", ""))


def stop_run(run: Run | None):
    """The Stop handler (runs beside the cancelled stream): say where the run stopped."""
    if run is None or run.state != "streaming":
        return gr.skip()
    run.state = "stopped"
    run.elapsed = time.perf_counter() - run.started
    return run.status()


def change_view(view: str, run: Run | None):
    """Switch the heatmap; a running stream picks the new view up at its next block."""
    if view not in figures.SHARE_VIEWS:
        return gr.skip()
    if run is None:
        return gr.skip()
    run.view = view
    if run.trace is None or run.trace.n_blocks == 0:
        return gr.skip()
    return figures.view_figure(run.trace, view)


# -- the UI ------------------------------------------------------------------------------------------------
def _model_summary(loaded: LoadedModel, adapter: AppAdapter | None) -> str:
    cfg = loaded.config
    dtype = str(loaded.dtype).replace("torch.", "")
    line = (f"**Model:** {loaded.name} · {cfg.num_hidden_layers} layers · {cfg.num_attention_heads} heads · "
            f"{loaded.device} · {dtype}")
    if adapter is not None:
        line += f" · adapter `{adapter.directory}`"
    return line


def build_app(loaded: LoadedModel, adapter: AppAdapter | str | Path | None = None) -> gr.Blocks:
    """The app around a loaded model; ``adapter`` is an AppAdapter or an adapter directory (applied here)."""
    if adapter is not None and not isinstance(adapter, AppAdapter):
        adapter = attach_adapter(loaded, adapter)
    defaults = adapter.settings() if adapter is not None else DEFAULT_SETTINGS
    blank = figures.empty_figure("Press Start to stream a document")
    view_choices = [(spec.label, key) for key, spec in figures.SHARE_VIEWS.items()]

    def start(*args):
        yield from stream_document(loaded, adapter, *args)

    with gr.Blocks(title="famviz: TransformerFAM memory", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("## famviz · watch TransformerFAM's working memory\n" + _model_summary(loaded, adapter))
        run_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                mode = gr.Radio(list(MODES), value=defaults.mode, label="Mode", elem_id="mode",
                                info="fam: block sliding window + feedback memory; bswa: window only; full: all tokens")
                with gr.Row():
                    block_size = gr.Number(defaults.block_size, label="Block size", precision=0, elem_id="block-size")
                    fam_len = gr.Number(defaults.fam_len, label="FAM length", precision=0, elem_id="fam-len")
                with gr.Row():
                    mem_blocks = gr.Number(defaults.mem_blocks, label="Memory blocks", precision=0,
                                           elem_id="mem-blocks")
                    max_tokens = gr.Number(DEFAULT_MAX_TOKENS, label="Max tokens", precision=0, elem_id="max-tokens")
                source = gr.Radio([(label, key) for key, label in SOURCES.items()], value="example", label="Document",
                                  elem_id="source")
                upload = gr.File(label="Upload (.txt .md .pdf .html)", file_types=list(SUPPORTED_SUFFIXES),
                                 type="filepath", elem_id="upload")
                pasted = gr.Textbox(label="Or paste text", lines=6, max_lines=12, placeholder="Paste a document here",
                                    elem_id="pasted")
                with gr.Row():
                    start_button = gr.Button("Start", variant="primary", elem_id="start")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=3):
                status = gr.Markdown("Ready: pick a document and press **Start**.", elem_id="status")
                view = gr.Dropdown(view_choices, value=DEFAULT_VIEW, label="Heatmap: attention share (mean over heads)",
                                   elem_id="heatmap-view")
                heatmap = gr.Plot(blank, label="Attention share per layer and block", elem_id="heatmap")
                with gr.Row():
                    nll = gr.Plot(blank, label="Next-token loss per block", elem_id="nll")
                    fam = gr.Plot(blank, label="FAM norm and update per layer", elem_id="fam")

        # Picking a file or typing text selects that source (in the browser, no round trip).
        upload.upload(None, None, source, js="() => 'upload'")
        pasted.input(None, None, source, js="() => 'paste'")
        run_event = start_button.click(
            start, [source, upload, pasted, mode, block_size, fam_len, mem_blocks, max_tokens, view, run_state],
            [status, heatmap, nll, fam, run_state], api_name="stream", show_progress="hidden",
        )
        stop_button.click(stop_run, [run_state], [status], cancels=[run_event], api_name="stop",
                          show_progress="hidden")
        view.change(change_view, [view, run_state], [heatmap], api_name="view", show_progress="hidden")
    demo.queue(default_concurrency_limit=1)
    return demo


# -- command line -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, metavar="ID_OR_PATH",
                        help="Hugging Face model id or local path (default: bundled SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, metavar="DIR", help="trained FAM adapter directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.INFO if args.verbose else logging.WARNING)  # gradio's own pings
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    try:
        from famviz.models import load_model

        started = time.perf_counter()
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        adapter = attach_adapter(loaded, args.adapter) if args.adapter else None
        log.info("famviz: %s loaded in %.1f s on %s (%s)", loaded.name, time.perf_counter() - started,
                 loaded.device, str(loaded.dtype).replace("torch.", ""))
        demo = build_app(loaded, adapter)
    except FamvizError as exc:
        print(f"famviz: error: {exc}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size="50mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())

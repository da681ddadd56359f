"""The app's PassKey tab: watch retention live, and sweep length × depth as the heatmap fills.

Built by ``build_passkey_tab(context)`` (``famviz.app.hub.AppContext``; ``context.hub`` holds the models). All
handlers are generators: they yield after every block (retention) or every trial (sweep), keep what
was computed when stopped, and turn bad input into a message instead of an exception.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from famviz.app.hub import AppContext, chosen_model, notes_markdown, status_notes
from famviz.app.inputs import (
    MAX_BLOCK_SIZE,
    MAX_FAM_LEN,
    MAX_MEM_BLOCKS,
    UPLOAD_LABEL,
    error_status,
    fraction,
    keeping_caption,
    number_list,
    read_uploaded_document,
    whole_number,
)
from famviz.app.views import PanelViews, SweepViews
from famviz.core.config import MODES, FamConfig
from famviz.core.engine import Stream
from famviz.core.fam_model import FamModel
from famviz.core.modes import MODE_TABLE
from famviz.errors import FamvizError
from famviz.probes import passkey as pk
from famviz.viz import export
from famviz.viz.passkey_figures import intervention_heatmap, passkey_heatmap, retention_figure

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from famviz.app.hub import AppAdapter
    from famviz.core.model import LoadedModel

log = logging.getLogger("famviz.app")

# The sweep's columns: every mode of the table, a bounded one with no memory blocks and with one.
MODE_CHOICES = [
    choice
    for row in MODE_TABLE.values()
    for choice in (
        [(f"{row.label}, no memory blocks", f"{row.name}:0"), (f"{row.label}, 1 memory block", f"{row.name}:1")]
        if row.bounded
        else [(row.label, row.name)]
    )
]
FILLER, UPLOAD = "PassKey filler", "Your document (upload)"
NO_UPLOAD = "No document uploaded: upload a file or use the PassKey filler."
MAX_LENGTH = 1_000_000
MAX_TRIALS = 1000
MAX_CELLS = 400
KEPT_SWEEPS = 3  # a new sweep keeps the previous ones (each labelled) up to this many
SWEEP_TITLE = "PassKey retrieval accuracy"


def _base(block_size: float | str | None, fam_len: float | str | None) -> FamConfig:
    return FamConfig(
        mode="fam",
        block_size=whole_number("Block size", block_size, 1, MAX_BLOCK_SIZE),
        fam_len=whole_number("FAM length", fam_len, 1, MAX_FAM_LEN),
        mem_blocks=0,
    )


def _fam_prompt(loaded: LoadedModel, adapter: AppAdapter | None, configs: list[FamConfig]) -> torch.Tensor | None:
    """The adapter's FAM prompt, once every run's settings are checked against the adapter (an AdapterError
    before anything runs)."""
    prompts = [adapter.prompt_for(loaded, config) for config in configs] if adapter is not None else []
    return prompts[0] if prompts else None


def _fam_model(loaded: LoadedModel, adapter: AppAdapter | None, spec: pk.ModeSpec, base: FamConfig) -> FamModel:
    config = pk.sweep_config(base, spec)
    return FamModel(loaded, config, fam_prompt=_fam_prompt(loaded, adapter, [config]))


def _export_path(stem: str, fmt: str) -> Path:
    return export.download_dir() / f"{stem}.{fmt}"


def _mode_tag(spec: pk.ModeSpec) -> str:
    """A mode with its memory blocks for file names: fam0, bswa1, full."""
    return MODE_TABLE[spec.mode].tag(spec.mem_blocks)


@dataclass
class SweepRecord:
    """One sweep: its cells (filled trial by trial) and what made them."""

    number: int  # counts the session's sweeps from 1: the sweep dropdown's value
    label: str  # names it in the dropdown and the table: number, time, model + adapter, modes, lengths
    caption: str  # the heatmap's subtitle and export caption: model + adapter, geometry, trials, seed
    config: dict  # what reproduces it (the download's "config")
    file_tag: str  # its modes and adapter in exported file names, e.g. "fam0-bswa0-balanced"
    cells: list = field(default_factory=list)


@dataclass
class PasskeySession:
    """One browser session's PassKey results (gr.State): the latest retention curve and interventions, and
    the last ``KEPT_SWEEPS`` sweeps (one of them shown)."""

    points: list = field(default_factory=list)
    key: int | None = None
    retention_caption: str = ""
    retention_file_tag: str = ""  # mode and adapter in exported file names, e.g. "fam0-balanced"
    sweeps: list[SweepRecord] = field(default_factory=list)
    shown_sweep: int | None = None  # the number of the sweep the heatmap and table show
    intervention: dict | None = None  # the latest FAM intervention result (famviz.probes.ablation's to_dict())
    intervention_caption: str = ""
    intervention_file_tag: str = ""

    @property
    def sweep(self) -> SweepRecord | None:
        """The sweep shown (what export and download write)."""
        return next((s for s in self.sweeps if s.number == self.shown_sweep), None)

    @property
    def cells(self) -> list:
        return self.sweep.cells if self.sweep is not None else []

    def caption(self, panel: str) -> str | None:
        """What the panel's plot shows now ("retention", "sweep" or "interventions"); None: nothing yet."""
        if panel == "retention":
            return self.retention_caption if self.points else None
        if panel == "sweep":
            return self.sweep.label if self.sweep is not None and self.sweep.cells else None
        return self.intervention_caption if self.intervention is not None else None

    def error(self, panel: str, message: str) -> str:
        """The error's status line; the panel's plot stays, and so does what made it."""
        return keeping_caption(error_status(message), self.caption(panel))

    def add_sweep(self, record: SweepRecord) -> None:
        """Show ``record``; the oldest sweep goes once more than ``KEPT_SWEEPS`` are kept."""
        self.sweeps = [*self.sweeps, record][-KEPT_SWEEPS:]
        self.shown_sweep = record.number


def _layer_list(layers: str) -> list[int] | None:
    """The interventions' layers from the form (None, when empty: every layer, and all of them at once)."""
    return None if not str(layers).strip() else [int(v) for v in number_list("Layers", layers, float, 0, 4096)]


def _could_not_start(
    session: PasskeySession, panel: str, exc: Exception, expected: tuple[type[Exception], ...] = (FamvizError,)
) -> str:
    """The panel's error status when its handler could not start: an ``expected`` error's message (bad input),
    else the unexpected error's type and message (its traceback goes to the log)."""
    if isinstance(exc, expected):
        return session.error(panel, str(exc))
    log.error("could not start the %s panel", panel, exc_info=exc)
    return session.error(panel, f"could not start: {type(exc).__name__}: {exc}")


# -- live retention -------------------------------------------------------------------------------------------
def watch_retention(
    context: AppContext,
    mode: str,
    mem_blocks: float | str | None,
    block_size: float | str | None,
    fam_len: float | str | None,
    length: float | str | None,
    depth: float | str | None,
    every: float | str | None,
    source: str,
    upload: str | None,
    seed: float | str | None,
    session: PasskeySession | None,
    model_choice: tuple | None = None,
) -> Iterator[PanelViews]:
    """Stream one PassKey prompt and probe the memory after every ``every`` blocks once the key went by,
    with the model of the Model panel (``model_choice``). Yields (status, retention figure, session) after
    every block."""
    session = session or PasskeySession()
    try:
        spec = pk.ModeSpec.parse(f"{mode}:{whole_number('Memory blocks', mem_blocks, 0, MAX_MEM_BLOCKS)}", 0)
        base = _base(block_size, fam_len)
        length = whole_number("Length", length, 64, MAX_LENGTH)
        every = whole_number("Probe every", every, 1, 10_000)
        seed = whole_number("Seed", seed, 0, 2**31 - 1)
        depth = fraction("Depth", depth)
        loaded, adapter = chosen_model(context, model_choice)
        fam_model = _fam_model(loaded, adapter, spec, base)
        label = loaded.label
        document = _retention_document(fam_model.loaded.tokenizer, source, upload, length, depth, seed)
    except Exception as exc:  # noqa: BLE001 (logged by _could_not_start): the app stays up
        yield PanelViews.only(status=_could_not_start(session, "retention", exc), session=session)
        return

    session.points, session.key = [], document.key
    session.retention_caption = (
        f"{label}; {spec.label}, block {base.block_size}, fam_len {base.fam_len}; "
        f"{document.length} tokens, key at depth {depth:g}, probe every {every} block(s)"
    )
    session.retention_file_tag = export.file_stem(_mode_tag(spec), export.adapter_tag(loaded.adapter))
    stream = Stream(fam_model, record=False)
    probe = pk.RetentionProbe(document.key, document.key_span[1], every).attach(stream)
    probe.points = session.points  # the session sees every point as soon as it is measured
    ids = document.haystack_ids
    total = -(-len(ids) // base.block_size)
    started = time.perf_counter()
    notes = notes_markdown(status_notes(adapter, [fam_model.config]))
    yield PanelViews(
        (
            f"Streaming {document.length:,} tokens ({total} blocks) with {spec.label} on {label}; key "
            f"**{document.key}**…{notes}"
        ),
        retention_figure([], document.key),
        session,
    )
    blocks = stream.blocks(ids)
    for index in range(total):
        try:
            next(blocks)
        except Exception as exc:  # keep the curve so far
            log.exception("retention stream failed")
            stopped = f"stopped at block {index}: {type(exc).__name__}: {exc}"
            yield PanelViews.only(status=session.error("retention", stopped), session=session)
            return
        status = (
            f"Block **{index + 1} / {total}** · {stream.position:,} tokens · "
            f"{time.perf_counter() - started:.1f} s · key {document.key}{_last_probe(session)}{notes}"
        )
        yield PanelViews(status, retention_figure(session.points, document.key), session)
    kept = sum(p.correct for p in session.points)
    yield PanelViews(
        (
            f"Done: key retrieved in **{kept} of {len(session.points)}** probes · {document.length:,} tokens · "
            f"{time.perf_counter() - started:.1f} s · {label}{notes}"
        ),
        retention_figure(session.points, document.key),
        session,
    )


def _retention_document(
    tokenizer: PreTrainedTokenizerBase, source: str, upload: str | None, length: int, depth: float, seed: int
) -> pk.PasskeyDocument:
    """The prompt to watch: the key in the PassKey filler, or in the uploaded document."""
    try:
        if source == UPLOAD:
            text = read_uploaded_document(upload, length, NO_UPLOAD).text
            return pk.make_document_probe(tokenizer, text, depth, length, seed=seed)
        return pk.make_passkey_document(tokenizer, length, depth, seed=seed)
    except ValueError as exc:
        raise FamvizError(str(exc)) from None


def _last_probe(session: PasskeySession) -> str:
    """The latest probe's outcome for the status line ("" before the first)."""
    if not session.points:
        return ""
    last = session.points[-1]
    said = "no number" if last.predicted is None else last.predicted
    return f" · last probe: {'retrieved' if last.correct else 'lost'} (answer {said}, log p {last.key_logprob:.2f})"


# -- sweeps -------------------------------------------------------------------------------------------------------
def _rows(cells: list[pk.CellResult]) -> list[list]:
    return [[c.label, c.length, c.depth, c.trials, round(c.accuracy, 3), round(c.mean_key_logprob, 3)] for c in cells]


def sweep_views(record: SweepRecord) -> dict:
    """The heatmap and table of one sweep, each naming the model and adapter that made it."""
    heatmap = passkey_heatmap(record.cells, f"{SWEEP_TITLE}<br><sup>{record.caption}</sup>")
    return {"heatmap": heatmap, "table": gr.update(value=_rows(record.cells), label=f"Cells of {record.label}")}


def sweep_choices(session: PasskeySession) -> dict:
    """The sweep dropdown: the kept sweeps, newest first, the shown one selected."""
    choices = [(s.label, s.number) for s in reversed(session.sweeps)]
    return gr.update(choices=choices, value=session.shown_sweep)


def show_sweep(number: int | None, session: PasskeySession | None) -> tuple:
    """The sweep dropdown's handler: the chosen kept sweep's heatmap and table."""
    if session is None or not any(s.number == number for s in session.sweeps):
        return gr.skip(), gr.skip()
    session.shown_sweep = number
    views = sweep_views(session.sweep)
    return views["heatmap"], views["table"]


def _new_sweep_record(
    session: PasskeySession,
    specs: list[pk.ModeSpec],
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int,
    base: FamConfig,
    loaded: LoadedModel,
    adapter: AppAdapter | None,
) -> SweepRecord:
    """The next sweep of the session, labelled, captioned and tagged with what makes it (no cells yet)."""
    number = session.sweeps[-1].number + 1 if session.sweeps else 1
    label = loaded.label
    return SweepRecord(
        number=number,
        label=f"sweep {number} ({time.strftime('%H:%M:%S')}): {label} · {', '.join(s.label for s in specs)} · "
        f"{', '.join(map(str, lengths))} tokens",
        caption=f"{label}; block {base.block_size}, fam_len {base.fam_len}; {trials} trials per cell, seed {seed}",
        config={
            "modes": [s.label for s in specs],
            "lengths": lengths,
            "depths": depths,
            "trials": trials,
            "seed": seed,
            "block_size": base.block_size,
            "fam_len": base.fam_len,
            "model": loaded.name,
            "adapter": str(adapter.directory) if adapter is not None else None,
        },
        file_tag=export.file_stem(*map(_mode_tag, specs), export.adapter_tag(loaded.adapter)),
    )


def run_sweep(
    context: AppContext,
    modes: list[str] | None,
    lengths: str,
    depths: str,
    trials: float | str | None,
    block_size: float | str | None,
    fam_len: float | str | None,
    seed: float | str | None,
    session: PasskeySession | None,
    model_choice: tuple | None = None,
) -> Iterator[SweepViews]:
    """Every (mode, length, depth) cell, trial by trial, with the Model panel's model (``model_choice``);
    yields (status, heatmap, table, sweep dropdown, session). The sweep is added to the session's kept ones
    (its heatmap and table drawn while it is the one shown)."""
    session = session or PasskeySession()
    try:
        if not modes:
            raise FamvizError("Pick at least one mode.")
        specs = [pk.ModeSpec.parse(m, 0) for m in modes]
        lengths = number_list("Lengths", lengths, int, 64, MAX_LENGTH)
        depths = number_list("Depths", depths, float, 0.0, 1.0)
        trials = whole_number("Trials", trials, 1, MAX_TRIALS)
        seed = whole_number("Seed", seed, 0, 2**31 - 1)
        base = _base(block_size, fam_len)
        if len(specs) * len(lengths) * len(depths) > MAX_CELLS:
            raise FamvizError(f"At most {MAX_CELLS} cells per sweep; use fewer modes, lengths or depths.")
        loaded, adapter = chosen_model(context, model_choice)
        label = loaded.label
        try:
            documents = pk.sweep_documents(loaded.tokenizer, lengths, depths, trials, seed)
        except ValueError as exc:
            raise FamvizError(str(exc)) from None
        fam_prompt = _fam_prompt(loaded, adapter, [pk.sweep_config(base, spec) for spec in specs])
    except Exception as exc:  # noqa: BLE001 (logged there): the app stays up, and earlier sweeps stay
        yield SweepViews.only(status=_could_not_start(session, "sweep", exc), session=session)
        return

    record = _new_sweep_record(session, specs, lengths, depths, trials, seed, base, loaded, adapter)
    session.add_sweep(record)

    def views() -> dict:  # the heatmap and table, unless another kept sweep is shown now
        return sweep_views(record) if session.shown_sweep == record.number else {}

    total = len(specs) * len(documents) * trials
    done, started = 0, time.perf_counter()
    notes = notes_markdown(status_notes(adapter, [pk.sweep_config(base, spec) for spec in specs]))
    kept = f" (earlier sweeps stay under *Sweeps*, the last {KEPT_SWEEPS} kept)" if len(session.sweeps) > 1 else ""
    yield SweepViews.only(
        status=f"Sweeping {len(specs) * len(documents)} cells × {trials} trials on {label}…{kept}{notes}",
        sweeps=sweep_choices(session),
        session=session,
        **views(),
    )
    cells, cell_starts = record.cells, True
    try:
        for step in pk.iter_sweep(loaded, specs, documents, base, fam_prompt):
            if cell_starts:
                cells.append(step.cell)
            else:
                cells[-1] = step.cell  # the running cell, redrawn trial by trial
            cell_starts = step.cell_done
            done += 1
            elapsed = time.perf_counter() - started
            status = (
                f"Trial **{done} / {total}** · {step.cell.label}, {step.cell.length:,} tokens, "
                f"depth {step.cell.depth:g} · {elapsed:.0f} s elapsed · {label}{notes}"
            )
            yield SweepViews.only(status=status, session=session, **views())
    except Exception as exc:  # keep the cells so far
        log.exception("sweep failed")
        stopped = f"stopped: {type(exc).__name__}: {exc}"
        yield SweepViews.only(status=session.error("sweep", stopped), session=session)
        return
    done_status = f"Done: {len(record.cells)} cells, {total} trials in {time.perf_counter() - started:.0f} s · {label}"
    yield SweepViews.only(status=done_status + notes, session=session, **views())


# -- interventions ------------------------------------------------------------------------------------------------
REDRAW_SECONDS = 1.0  # the heatmap is redrawn at most this often while interventions come in
INTERVENTION_METHODS = [
    ("ablate: initial FAM instead", "ablate"),
    ("patch: FAM of another key", "patch"),
    ("write time: clean FAM into the other key's run", "write-time"),
]


def run_interventions_tab(
    context: AppContext,
    method: str,
    length: float | str | None,
    depth: float | str | None,
    trials: float | str | None,
    layers: str,
    blocks: str,
    block_size: float | str | None,
    fam_len: float | str | None,
    seed: float | str | None,
    session: PasskeySession | None,
    model_choice: tuple | None = None,
) -> Iterator[PanelViews]:
    """FAM ablation / patching (``famviz.probes.ablation``) with the Model panel's model; yields (status, heatmap,
    session) as the interventions finish, the heatmap redrawn about once a second."""
    from famviz.probes import ablation as ab

    session = session or PasskeySession()
    try:
        ab.check_method(method)
        length = whole_number("Length", length, 64, MAX_LENGTH)
        trials = whole_number("Trials", trials, 1, 100)
        seed = whole_number("Seed", seed, 0, 2**31 - 1)
        depth = fraction("Depth", depth)
        base = _base(block_size, fam_len)
        layer_list = _layer_list(layers)
        loaded, adapter = chosen_model(context, model_choice)
        fam_model = _fam_model(loaded, adapter, pk.ModeSpec("fam", 0), base)
        cases = ab.passkey_cases(loaded.tokenizer, base.block_size, length, depth, trials, seed)
        n_blocks = cases[0][0].blocks(base.block_size)
        block_list = list(range(1, n_blocks + 1)) if blocks == "all" else None
        results = ab.iter_interventions(fam_model, cases, method, blocks=block_list, layers=layer_list)
    except Exception as exc:  # noqa: BLE001 (logged by _could_not_start): the app stays up
        status = _could_not_start(session, "interventions", exc, expected=(FamvizError, ValueError))
        yield PanelViews.only(status=status, session=session)
        return
    label = loaded.label
    session.intervention_file_tag = export.file_stem(method, "fam0", export.adapter_tag(loaded.adapter))
    session.intervention_caption = (
        f"{label}; block {base.block_size}, FAM {base.fam_len}, memory blocks 0; "
        f"PassKey {length} tokens, depth {depth:g}; {trials} trials, seed {seed}"
    )
    config = {
        "model": loaded.name,
        "adapter": str(adapter.directory) if adapter is not None else None,
        "length": length,
        "depth": depth,
        "seed": seed,
        **fam_model.config.to_dict(),
    }
    notes = notes_markdown(status_notes(adapter, [fam_model.config]))
    yield PanelViews(f"Intervening ({method}) on {label}…{notes}", intervention_heatmap({}), session)
    started, drawn, done, result = time.perf_counter(), 0.0, 0, None
    try:
        for result in results:
            done += 1
            session.intervention = dict(result.to_dict(), config=config)
            if time.perf_counter() - drawn >= REDRAW_SECONDS:
                drawn = time.perf_counter()
                progress = (
                    f"Intervention **{done}** · trial {result.trials} / {trials} · {drawn - started:.0f} s elapsed"
                )
                yield PanelViews(f"{progress} · {label}{notes}", intervention_heatmap(session.intervention), session)
    except Exception as exc:
        log.exception("interventions failed")
        yield PanelViews.only(
            status=session.error("interventions", f"stopped: {type(exc).__name__}: {exc}"), session=session
        )
        return
    values = ", ".join(f"{k} {v:.2f}" for k, v in (result.values if result else {}).items())
    yield PanelViews(
        (
            f"Done: {done} interventions in {time.perf_counter() - started:.0f} s · mean log p(key): {values} · "
            f"{label}{notes}"
        ),
        intervention_heatmap(session.intervention or {}),
        session,
    )


def export_passkey(which: str, fmt: str, session: PasskeySession | None) -> tuple:
    """The retention curve, the shown sweep's heatmap or the interventions as a paper-ready file named by its
    mode(s) and adapter; returns (file, note)."""
    if (
        session is None
        or (which == "heatmap" and not session.cells)
        or (which == "retention" and not session.points)
        or (which == "interventions" and not session.intervention)
    ):
        return gr.skip(), "Nothing to export yet: run it first."

    def write() -> Path:
        if which == "interventions":
            fig, caption, meta, size, tag = (
                intervention_heatmap(session.intervention),
                session.intervention_caption,
                session.intervention["config"],
                (1100, 700),
                session.intervention_file_tag,
            )
        elif which == "heatmap":
            sweep = session.sweep
            fig, caption, meta, size, tag = (
                passkey_heatmap(sweep.cells, SWEEP_TITLE),  # the caption under it says what made it
                sweep.caption,
                sweep.config,
                (1100, 420),
                sweep.file_tag,
            )
        else:
            fig, caption, meta, size, tag = (
                retention_figure(session.points, session.key),
                session.retention_caption,
                {"key": session.key},
                (900, 520),
                session.retention_file_tag,
            )
        path = _export_path(export.file_stem(f"famviz-passkey-{which}", tag), fmt)
        return export.write_figure(fig, path, fmt, caption=caption, metadata=meta, size=size)

    file, note = export.export_for_download(write)
    return file or gr.skip(), note


def download_results(session: PasskeySession | None) -> tuple:
    """The shown sweep as the CLI's JSON: {"results": [...], "config": {...}}."""
    if session is None or not session.cells:
        return gr.skip(), "No sweep results yet."
    sweep = session.sweep
    path = _export_path(export.file_stem("famviz-passkey-sweep", sweep.file_tag), "json")
    path.write_text(json.dumps({"results": [c.summary() for c in sweep.cells], "config": sweep.config}, indent=1))
    return str(path), f"Results **{path.name}** ({sweep.label}): {len(sweep.cells)} cells."


# -- the tab --------------------------------------------------------------------------------------------------------
INTRO = (
    "Hide a pass key in irrelevant text and ask for it at the end (the paper's PassKey test). "
    "**Watch retention** streams one prompt and, after every *k* blocks once the key has gone by, forks "
    "the memory, asks the question and decodes the answer: does the memory still hold the key? "
    "**Sweep** measures accuracy over lengths × depths for several modes. Depth 0 puts the key right "
    "after the instruction (the paper's setting), 1 right before the question."
)
INTERVENTIONS_NOTE = (
    "Attention shares say where a query looks; interventions say what the memory is used for. Each cell "
    "replaces the FAM of one layer (or of all) as it stands after a block, then streams on to the question "
    "and scores log p(key): **ablate** puts the initial FAM there (what the model knows without memory), "
    "**patch** the FAM of the same prompt with another key (the key's causal path), **write time** patches "
    "the clean FAM into that other key's run after each block (when the key entered memory, and where it "
    "stays). Red: the key became less likely; blue: more. FAM mode, no memory blocks, the Model panel's model."
)


@dataclass
class SharedInputs:
    """The tab's inputs every panel reads: the geometry, the seed and the session's results."""

    block_size: gr.Number
    fam_len: gr.Number
    seed: gr.Number
    session: gr.State


def build_passkey_tab(context: AppContext) -> None:
    with gr.Tab("PassKey", id="passkey", elem_id="tab-passkey"):
        session = gr.State(None)  # inside the tab: another child of gr.Tabs would show as a second tab label
        gr.Markdown(INTRO)
        with gr.Row():
            trained = context.defaults  # the startup adapter's geometry (the tool's defaults without one)
            block_size = gr.Number(
                value=trained.block_size, precision=None, step=1, label="Block size (tokens)", elem_id="pk-block-size"
            )
            fam_len = gr.Number(
                value=trained.fam_len, precision=None, step=1, label="FAM length (slots)", elem_id="pk-fam-len"
            )
            seed = gr.Number(value=0, precision=None, step=1, label="Seed", elem_id="pk-seed")
        shared = SharedInputs(block_size, fam_len, seed, session)
        _retention_panel(context, shared)
        _sweep_panel(context, shared)
        _interventions_panel(context, shared)
        _export_panel(session)


def _run_on_chosen_model(
    context: AppContext,
    button: gr.Button,
    stop: gr.Button,
    handler: Callable,
    inputs: list,
    outputs: list,
    api_name: str,
) -> None:
    """``handler(context, *inputs, model_choice=...)`` on the Model panel's choice (its four inputs come first),
    queued on the model with the inspector's stream (one forward pass at a time), ``stop`` cancelling it, and
    the page's model line redrawn after it."""

    def run(
        model: str | None, adapter_dir: str | None, device: str | None, dtype: str | None, *args: object
    ) -> Iterator:
        yield from handler(context, *args, model_choice=(model, adapter_dir, device, dtype))

    event = button.click(
        run,
        [*context.model_inputs, *inputs],
        outputs,
        api_name=api_name,
        show_progress="hidden",
        concurrency_id="model",
        concurrency_limit=1,
    )
    stop.click(None, cancels=[event])
    context.refresh_header_after(event)


def _retention_panel(context: AppContext, shared: SharedInputs) -> None:
    gr.Markdown("### Watch retention")
    with gr.Row():
        mode = gr.Radio(list(MODES), value="fam", label="Mode", elem_id="pk-mode")
        mem_blocks = gr.Number(
            value=context.defaults.mem_blocks if context.hub.default[1] else 0,
            precision=None,
            step=1,
            label="Memory blocks",
            elem_id="pk-mem-blocks",
        )
        length = gr.Number(value=2000, precision=None, step=1, label="Length (tokens)", elem_id="pk-length")
        depth = gr.Slider(0, 1, value=0, step=0.05, label="Key depth", elem_id="pk-depth")
        every = gr.Number(value=1, precision=None, step=1, label="Probe every k blocks", elem_id="pk-every")
    context.geometry_fields.append((shared.block_size, shared.fam_len, mem_blocks))
    with gr.Row():
        source = gr.Radio([FILLER, UPLOAD], value=FILLER, label="Hide the key in", elem_id="pk-source")
        upload = gr.File(label=f"Document {UPLOAD_LABEL}", type="filepath", elem_id="pk-upload")
    with gr.Row():
        button = gr.Button("Watch retention", variant="primary", elem_id="pk-watch")
        stop = gr.Button("Stop", variant="stop", elem_id="pk-watch-stop")
    status = gr.Markdown("", elem_id="pk-retention-status")
    plot = gr.Plot(retention_figure([]), label="Retention", elem_id="pk-retention")
    upload.upload(None, None, source, js=f"() => '{UPLOAD}'")
    inputs = [mode, mem_blocks, shared.block_size, shared.fam_len, length, depth, every, source, upload, shared.seed]
    outputs = list(PanelViews(status, plot, shared.session))
    _run_on_chosen_model(
        context, button, stop, watch_retention, [*inputs, shared.session], outputs, "passkey_retention"
    )


def _sweep_panel(context: AppContext, shared: SharedInputs) -> None:
    gr.Markdown("### Sweep length × depth")
    with gr.Row():
        modes = gr.CheckboxGroup(MODE_CHOICES, value=["fam:0", "bswa:0", "full"], label="Modes", elem_id="pk-modes")
        lengths = gr.Textbox(value="1000,2000", label="Lengths (tokens)", elem_id="pk-lengths")
        depths = gr.Textbox(value="0,0.5,1", label="Depths", elem_id="pk-depths")
        trials = gr.Number(value=3, precision=None, step=1, label="Trials per cell", elem_id="pk-trials")
    with gr.Row():
        button = gr.Button("Run sweep", variant="primary", elem_id="pk-sweep")
        stop = gr.Button("Stop", variant="stop", elem_id="pk-sweep-stop")
    status = gr.Markdown("", elem_id="pk-sweep-status")
    sweeps = gr.Dropdown(
        [], value=None, label=f"Sweeps (the last {KEPT_SWEEPS} are kept; pick one to show)", elem_id="pk-sweeps"
    )
    heatmap = gr.Plot(passkey_heatmap([], SWEEP_TITLE), label="Accuracy", elem_id="pk-heatmap")
    table = gr.Dataframe(
        headers=["mode", "length", "depth", "trials", "accuracy", "mean log p(key)"],
        label="Cells",
        interactive=False,
        elem_id="pk-table",
    )
    inputs = [modes, lengths, depths, trials, shared.block_size, shared.fam_len, shared.seed, shared.session]
    outputs = list(SweepViews(status, heatmap, table, sweeps, shared.session))
    _run_on_chosen_model(context, button, stop, run_sweep, inputs, outputs, "passkey_sweep")
    sweeps.input(show_sweep, [sweeps, shared.session], [heatmap, table], show_progress="hidden")


def _interventions_panel(context: AppContext, shared: SharedInputs) -> None:
    gr.Markdown("### Where the memory keeps the key: interventions on the FAM")
    gr.Markdown(INTERVENTIONS_NOTE, elem_id="note-interventions")
    with gr.Row():
        method = gr.Radio(INTERVENTION_METHODS, value="ablate", label="Method", elem_id="ab-method")
        length = gr.Number(value=1024, precision=None, step=1, label="Length (tokens)", elem_id="ab-length")
        depth = gr.Slider(0, 1, value=0, step=0.05, label="Key depth", elem_id="ab-depth")
        trials = gr.Number(value=1, precision=None, step=1, label="Trials", elem_id="ab-trials")
        layers = gr.Textbox(value="", label="Layers (empty: all)", elem_id="ab-layers")
        blocks = gr.Radio(
            [("the question block's FAM", "last"), ("after every block", "all")],
            value="last",
            label="Replace the FAM after",
            elem_id="ab-blocks",
            info="write time always uses every block",
        )
    with gr.Row():
        button = gr.Button("Run interventions", variant="primary", elem_id="ab-run")
        stop = gr.Button("Stop", variant="stop", elem_id="ab-stop")
    status = gr.Markdown("", elem_id="ab-status")
    plot = gr.Plot(intervention_heatmap({}), label="Δ log p(key)", elem_id="ab-heatmap")
    inputs = [method, length, depth, trials, layers, blocks, shared.block_size, shared.fam_len, shared.seed]
    outputs = list(PanelViews(status, plot, shared.session))
    _run_on_chosen_model(
        context, button, stop, run_interventions_tab, [*inputs, shared.session], outputs, "passkey_interventions"
    )


def _export_panel(session: gr.State) -> None:
    static_problem = export.static_export_problem()
    with gr.Row():
        which = gr.Radio(
            [("Sweep heatmap", "heatmap"), ("Retention curve", "retention"), ("Intervention heatmap", "interventions")],
            value="heatmap",
            label="Export",
            elem_id="pk-export-which",
        )
        fmt = gr.Radio(
            list(export.FORMATS) if static_problem is None else ["html"],
            value="svg" if static_problem is None else "html",
            label="Format",
            elem_id="pk-export-format",
        )
        export_button = gr.Button("Export figure", elem_id="pk-export")
        json_button = gr.Button("Download results (.json)", elem_id="pk-download")
    file = gr.File(label="Exported file", interactive=False, elem_id="pk-export-file")
    note = gr.Markdown("" if static_problem is None else f"**Note:** {static_problem}", elem_id="pk-export-note")
    export_button.click(export_passkey, [which, fmt, session], [file, note], api_name="passkey_export")
    json_button.click(download_results, [session], [file, note], api_name="passkey_download")

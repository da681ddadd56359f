"""The app (famviz.app, launched by app.py): input checks, the stream handler on a tiny random model, view controls,
export/trace handlers, session isolation; slow: the served app driven through gradio_client."""

from __future__ import annotations

import html
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from famviz.app import (  # noqa: E402
    MIN_REDRAW_SECONDS,
    inputs,
    inspector_tab,
    launch,
)
from famviz.app import hub as app_hub  # noqa: E402
from famviz.core.config import FamConfig  # noqa: E402
from famviz.core.fam_model import FamModel  # noqa: E402
from famviz.viz import figures  # noqa: E402
from famviz.viz.inspector import Run  # noqa: E402

GPL3 = Path("/usr/share/common-licenses/GPL-3")
TEXT = " ".join(f"Sentence number {i} says something about memory and attention." for i in range(40))


# -- inputs (no model) ------------------------------------------------------------------------------------
def test_command_line_options():
    from famviz.commands.app import standalone_parser

    parser = standalone_parser()
    args = parser.parse_args([])
    assert (args.model, args.adapter, args.device, args.dtype, args.host, args.port) == (
        None,
        None,
        "auto",
        "auto",
        "127.0.0.1",
        7860,
    )
    help_text = parser.format_help()
    for option in ("--model", "--adapter", "--device", "--dtype", "--host", "--port", "--redraw-seconds"):
        assert option in help_text
    assert args.redraw_seconds == MIN_REDRAW_SECONDS


def test_parse_settings():
    config, limit = inputs.parse_settings("bswa", 32, 0, 2, 100.0)
    assert (config.mode, config.block_size, config.fam_len, config.mem_blocks, limit) == ("bswa", 32, 0, 2, 100)
    config, _ = inputs.parse_settings("full", 32, None, 0, 100)  # FAM length is unused outside fam mode
    assert config.active_fam_len == 0


@pytest.mark.parametrize(
    "settings, words",
    [
        (("fam", None, 64, 1, 4096), "Block size is empty"),
        (("fam", 0, 64, 1, 4096), "Block size must be from 1"),
        (("fam", 2.5, 64, 1, 4096), "whole number"),
        (("fam", 256, 0, 1, 4096), "FAM length must be from 1"),
        (("fam", 256, 64, -1, 4096), "Memory blocks must be from 0"),
        (("fam", 256, 64, 1, 0), "Max tokens must be from 1"),
        (("sparse", 256, 64, 1, 4096), "mode must be one of"),
    ],
)
def test_bad_settings_are_one_clear_message(settings, words):
    from famviz.errors import FamvizError

    with pytest.raises(FamvizError, match=words):
        inputs.parse_settings(*settings)


def test_documents_from_each_source(tmp_path):
    from famviz.errors import FamvizError

    doc = tmp_path / "notes.md"
    doc.write_text("# Title\r\nSome text.\r\n")
    assert inputs.read_input_document("upload", str(doc), None) == ("# Title\nSome text.\n", "notes.md", None)
    assert inputs.read_input_document("paste", None, "a\r\nb") == ("a\nb", "pasted text", None)
    if GPL3.exists():
        text, name, _ = inputs.read_input_document("example", None, None)
        assert "GNU GENERAL PUBLIC LICENSE" in text and name
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin1 = tmp_path / "old.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    scanned = tmp_path / "scan.pdf"
    scanned.write_bytes(_pdf_without_text())
    for source, upload, pasted, words in [
        ("upload", None, None, "No file uploaded"),
        ("paste", None, "  \n ", "No text pasted"),
        ("upload", str(binary), None, "binary file"),
        ("upload", str(empty), None, "empty"),
        ("upload", str(latin1), None, "not valid UTF-8"),
        ("upload", str(scanned), None, "text layer"),
        ("somewhere", None, None, "Unknown document source"),
    ]:
        with pytest.raises(FamvizError, match=words):
            inputs.read_input_document(source, upload, pasted)


def test_oversized_upload_states_the_limit(tmp_path, monkeypatch):
    from famviz.errors import DocumentError

    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * 300)
    monkeypatch.setattr(inputs, "MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(DocumentError, match="big.txt.*(limit|larger)"):
        inputs.read_input_document("upload", str(big), None)
    # With few max tokens, only the start that they can need is read (plain text; 64 bytes a token).
    text, name, cut = inputs.read_input_document("upload", str(big), None, max_tokens=5)
    assert text == ("word " * 64) and name == "big.txt" and cut == "the first 320 bytes of a 1,500 bytes file"
    page = tmp_path / "big.html"
    page.write_bytes(b"<p>" + b"word " * 300 + b"</p>")
    with pytest.raises(DocumentError, match="big.html.*HTML files are read whole"):
        inputs.read_input_document("upload", str(page), None, max_tokens=5)


def test_a_large_upload_streams_its_start_and_says_so(hub, tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 3)
    monkeypatch.setattr(inputs, "MAX_DOCUMENT_BYTES", 2000)
    status = _run(hub, source="upload", upload=str(big), max_tokens=40)[-1].status
    assert f"40 / 40 tokens (the first 2,000 bytes of a {big.stat().st_size:,} bytes file: document cut" in status


def test_uploads_take_any_text_file_and_refuse_others_with_one_message(tiny_loaded, hub, tmp_path):
    """A .py file was refused in the browser by its suffix (a toast) and then by Start ("No file uploaded"),
    while the CLI reads it: the page accepts any file and the reader decides by content."""
    demo = launch.build_app(tiny_loaded)
    uploads = {b.elem_id: b for b in demo.blocks.values() if b.elem_id in ("upload", "pk-upload")}
    assert set(uploads) == {"upload", "pk-upload"}
    assert all(upload.file_types is None for upload in uploads.values())
    script = tmp_path / "script.py"
    script.write_text(TEXT)
    status = _run(hub, source="upload", upload=str(script))[-1].status
    assert status.startswith("**Done**") and "script.py" in status
    binary = tmp_path / "notes.txt"  # a text file's name, binary content: the content decides
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.py"
    empty.write_bytes(b"")
    for refused, words in ((binary, "binary"), (empty, "empty")):
        updates = _run(hub, source="upload", upload=str(refused))
        assert len(updates) == 1 and updates[0].status.count(inputs.ERROR_MARK) == 1 and words in updates[0].status


def _pdf_without_text() -> bytes:
    """A one-page PDF with no text layer (what a scan looks like to a text extractor)."""
    import io

    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# -- the stream handler on a tiny random model --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded():
    from helpers import tiny_llama_with_bundled_tokenizer

    return tiny_llama_with_bundled_tokenizer(n_layers=2)


@pytest.fixture(scope="module")
def hub(tiny_loaded):
    return app_hub.ModelHub(tiny_loaded, None, ("tiny", None, "auto", "auto"))


def _args(**kwargs):
    args = dict(
        model="tiny",
        adapter="",
        device="auto",
        dtype="auto",
        source="paste",
        upload=None,
        pasted=TEXT,
        passkey_tokens=300,
        mode="fam",
        compare="off",
        block_size=32,
        fam_len=8,
        mem_blocks=1,
        max_tokens=4096,
        trajectory_layers="",
        lens_layers="",
        token_shares=False,
        previous=None,
    )
    args.update(kwargs)
    return list(args.values())


def _run(hub, redraw_seconds: float = MIN_REDRAW_SECONDS, **kwargs):
    return list(inspector_tab.stream_document(hub, *_args(**kwargs), redraw_seconds=redraw_seconds))


def _n_blocks(loaded, text=TEXT, block=32):
    from famviz import tokenize_document

    return -(-len(tokenize_document(loaded.tokenizer, text)[0]) // block)


@pytest.mark.parametrize("mode", ["fam", "bswa", "full"])
def test_stream_yields_once_per_block(tiny_loaded, hub, mode):
    n_blocks = _n_blocks(tiny_loaded)
    updates = _run(hub, mode=mode)
    assert len(updates) == 1 + n_blocks  # "starting" (hands the run to the session), then one per block
    assert all(isinstance(u, inspector_tab.InspectorViews) for u in updates)
    status, heatmap, heads, document, trajectory, dynamics, nll, lens, slots, slider, layer, view, run = updates[-1]
    assert status.startswith("**Done**") and f"{n_blocks} / {n_blocks} blocks" in status
    assert np.asarray(heatmap.data[0].z).shape == (2, n_blocks)
    assert np.asarray(heads.data[0].z).shape == (2, 4)
    assert len(nll.data[0].y) == n_blocks
    assert run.trace.text == TEXT and run.trace.meta["document"] == "pasted text"
    assert bool(dynamics.data) == bool(trajectory.data) == (mode == "fam")
    assert not lens.data and not slots.data  # the slot layers were left empty
    assert ('class="tok s' in document) == (mode == "fam")
    assert slider["maximum"] == n_blocks - 1 and slider["value"] == n_blocks - 1
    first = updates[1].status
    assert first.startswith("**Streaming**") and "tokens/s" in first and "elapsed" in first
    assert updates[1].layer["choices"][0][1] == "mean"  # the layer choices come with the first block


def test_trajectory_records_only_the_chosen_layers(tiny_loaded, hub):
    run = _run(hub, trajectory_layers="1")[-1].run
    assert run.trace.layers_of("fam.state") == [1] and run.features.layers == [1]
    assert run.features.n_blocks == run.blocks_done
    assert [t.name for t in run.trajectory().data if t.name] == ["layer 1"]


def test_compare_mode_streams_both_and_shows_the_benefit(tiny_loaded, hub):
    from famviz import FamConfig, Stream, tokenize_document

    run = _run(hub, compare="bswa")[-1].run
    assert len(run.compare_nll) == run.blocks_done
    ids = tokenize_document(tiny_loaded.tokenizer, TEXT)[0]
    bswa = Stream(tiny_loaded, FamConfig(mode="bswa", block_size=32, fam_len=8, mem_blocks=1), record=False).run(ids)
    np.testing.assert_allclose(run.compare_nll, figures.block_means(bswa.nll, list(range(0, len(ids), 32))), rtol=1e-5)
    fig = run.loss()
    assert [t.name for t in fig.data][:2] == ["fam", "bswa"] and fig.data[2].type == "bar"
    assert "fam vs bswa" in run.status()


def test_stream_respects_max_tokens(hub):
    updates = _run(hub, max_tokens=70)
    assert len(updates) == 1 + 3  # 32 + 32 + 6 tokens
    assert updates[-1].run.trace.n_tokens == 70


def test_passkey_example(hub):
    run = _run(hub, source="passkey", passkey_tokens=200, block_size=64)[-1].run
    assert "PassKey" in run.document and 150 < run.tokens_done < 260


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(pasted=""), "No text pasted"),
        (dict(block_size=-3), "Block size"),
        (dict(source="upload"), "No file uploaded"),
        (dict(compare="fam"), "different from fam"),
        (dict(trajectory_layers="7"), "does not exist"),
        (dict(model="./no/such/model"), "does not exist"),
    ],
)
def test_stream_errors_are_one_status_and_keep_the_plots(hub, kwargs, words):
    import gradio as gr

    updates = _run(hub, **kwargs)
    status, *rest = updates[-1]
    assert status.startswith("**Error:**") and words in status
    skip = gr.skip()
    assert all(type(item) is type(skip) and item == skip for item in rest)  # previous results stay


def test_each_mode_opens_on_a_view_it_has_and_a_view_it_lacks_says_so(hub):
    """Sink mode once opened on "Block queries → FAM": all zeros and no word of why."""
    updates = _run(hub, mode="sink")
    run = updates[-1].run
    assert run.view == "block-sink" and updates[1].view["value"] == "block-sink"  # the dropdown follows
    heatmap = updates[-1].heatmap
    assert heatmap.layout.title.text == figures.SHARE_VIEWS["block-sink"].title
    assert np.nanmax(np.asarray(heatmap.data[0].z, dtype=float)) > 0  # later blocks read the kept first tokens
    heatmap, heads = inspector_tab.change_view("block-fam", run)
    for figure in (heatmap, heads):
        assert not figure.data and "sink mode has no FAM" in figure.layout.annotations[0].text
        assert "Block queries → sink tokens" in figure.layout.annotations[0].text  # what to pick instead
    # The next run keeps the view where its mode has it, else takes its own.
    assert _run(hub, mode="fam", previous=run)[-1].run.view == "block-fam"
    run.view = "block-block"
    assert _run(hub, mode="bswa", previous=run)[-1].run.view == "block-block"
    bswa = _run(hub, mode="bswa", mem_blocks=0)[-1].run
    assert bswa.view == "block-block"
    assert "no memory blocks" in inspector_tab.change_view("block-memory", bswa)[0].layout.annotations[0].text


def test_after_an_error_the_status_still_names_the_run_the_plots_show(hub):
    """The status line is the plots' caption: an error in a later Start adds to it instead of
    replacing it; only the error's paragraph is repeated beside Start."""
    import gradio as gr

    run = _run(hub, mode="bswa")[-1].run
    status, *rest = _run(hub, block_size=-3, previous=run)[-1]
    first, shown = status.split("\n\n", 1)
    assert first.startswith("**Error:**") and "Block size" in first
    assert shown == f"{inputs.PLOTS_STILL_SHOW} {run.status()}"
    assert "pasted text" in shown and "bswa" in shown and run.model_label in shown
    assert all(type(item) is type(gr.skip()) for item in rest)  # plots and run stay
    assert _run(hub, block_size=-3, previous=None)[-1].status.startswith("**Error:**")  # nothing shown: error only
    replayed = inspector_tab.replay_trace("/no/such/trace.npz", run).status
    assert replayed.startswith("**Error:**") and inputs.PLOTS_STILL_SHOW in replayed


def test_only_the_error_paragraph_goes_beside_start():
    """The page's script (run by node where there is one): the error, not the kept run's status after it."""
    import json
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("no node to run the page's script")
    statuses = ["**Error:** boom\n\nThe plots still show: **Done** · x", "**Failed** · x\n\n**Error:** old", "**Done**"]
    script = f"console.log(JSON.stringify({json.dumps(statuses)}.map({inspector_tab.ERROR_BESIDE_START_JS})))"
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == ["**Error:** boom", "**Error:** old", ""]


def test_the_memory_lens_view_decodes_the_recorded_layers_and_follows_the_controls(hub):
    updates = _run(hub, lens_layers="0, 1")
    run = updates[-1].run
    assert run.trace.layers_of("fam.lens") == [0, 1]
    lens = updates[-1].lens
    cells = np.asarray(lens.data[0].z)
    assert cells.shape == (8, run.blocks_done) and ((cells > 0) & (cells <= 1)).all()  # 8 slots × blocks
    assert "layer 1" in lens.layout.title.text and "top tokens" in lens.layout.title.text
    hover = lens.data[0].text[0][0]
    assert hover.count("<br>") == run.trace.meta["lens_top_k"] - 1  # one line per kept token
    _, _, lens, slots = inspector_tab.change_layer("0", run)
    assert "layer 0" in lens.layout.title.text and "layer 0" in slots.layout.title.text
    _, _, lens, slots = inspector_tab.change_layer("mean", run)
    assert "layer 1" in lens.layout.title.text  # no layer chosen: the top recorded one
    assert [np.asarray(h.z).shape for h in slots.data] == [(8, run.blocks_done)] * 3  # norm, update, received
    document, _ = inspector_tab.change_slot(3, run)
    assert run.slot == 3 and "slot 3 of layer 1" in document
    assert inspector_tab.change_slot("8", run)[1] == "" and run.slot == 3  # no slot 8 in a FAM of 8: cleared
    assert "content tokens only" in inspector_tab.change_content(True, run) and run.content_only
    assert "content tokens only" not in inspector_tab.change_content(False, run)
    document, _ = inspector_tab.change_slot("", run)
    assert run.slot is None and "slot" not in document.split("FAM read (")[1][:20]
    _, _, _, lens, _ = inspector_tab.drag_block(1, run)
    assert list(lens.data[0].x) == [0, 1] and "after block 1" in lens.layout.title.text
    unrecorded = _run(hub)[-1].lens  # the layer field left empty: nothing recorded, and the view says so
    assert not unrecorded.data and "did not record the memory lens" in unrecorded.layout.annotations[0].text
    bad = _run(hub, lens_layers="0, 1, 0, 1, x")
    assert "memory lens layers must be whole numbers" in bad[-1].status


def test_a_prediction_is_attributed_through_the_memory_and_shades_the_document(hub):
    from famviz.probes.attribution import attribute

    run = _run(hub)[-1].run
    target = run.trace.n_tokens - 5  # in the last block: earlier blocks reach it through the FAM only
    document, note, block, follow = inspector_tab.attribute_prediction(hub, target, run)
    assert f"Token {target:,}" in note and "|gradient × input|" in note and follow is False
    assert run.attribution[0] == target and block["value"] == run.shown_block == run.blocks_done - 1
    assert f"|attribution| of token {target:,}" in document
    fam_model = FamModel(hub.default[0], run.config)
    expected = attribute(fam_model, run.trace.token_ids[:target], [run.trace.token_ids[target]]).scores
    np.testing.assert_allclose(run.attribution[1], expected, rtol=1e-5, atol=1e-7)  # the probe's own numbers
    document, note, _, _ = inspector_tab.attribute_prediction(hub, "", run)  # cleared: FAM reads again
    assert run.attribution is None and "FAM read (" in document and note == ""
    for bad, words in ((0, "between 1 and"), ("x", "whole number"), (10**6, "between 1 and")):
        assert words in inspector_tab.attribute_prediction(hub, bad, run)[1]
    replayed = Run.from_trace(run.trace, "run.npz")
    assert "replayed trace has no model" in inspector_tab.attribute_prediction(hub, 3, replayed)[1]


def test_the_token_drill_down_shows_one_tokens_own_attention(hub):
    run = _run(hub, token_shares=True)[-1].run
    assert "block.token_share" in run.trace.keys
    heads = inspector_tab.change_token("40", run)
    assert heads.layout.title.text.startswith("Token 40") and np.asarray(heads.data[0].z).shape == (2, 4)
    own = run.trace["block.1.token_share"][:, 0, 40].astype(np.float32)  # layer 1: share on the FAM per head
    np.testing.assert_allclose(np.asarray(heads.data[0].z)[1], own, atol=1e-3)
    assert inspector_tab.change_token(" ", run).layout.title.text.startswith("Block")  # back to the block mean
    plain = _run(hub)[-1].run
    assert "did not record each token" in inspector_tab.change_token(3, plain).layout.annotations[0].text


def test_view_controls_act_on_the_run(hub):
    import gradio as gr

    run = _run(hub)[-1].run
    heatmap, heads = inspector_tab.change_view("fam-block", run)
    assert run.view == "fam-block" and heatmap.layout.title.text == figures.SHARE_VIEWS["fam-block"].title
    heads, document, lens, slots = inspector_tab.change_layer("1", run)
    assert run.layer == 1 and "layer 1" in document and heads.layout.shapes
    heatmap, heads, document, lens, follow = inspector_tab.drag_block(2, run)
    assert run.shown_block == 2 and "Block 2" in heads.layout.title.text and "block 2" in document
    assert follow is False  # dragging the slider stops following the latest block
    inspector_tab.select_block(2, True, run)
    assert run.shown_block == run.blocks_done - 1
    broken = Run(config=run.config, document="x", total_tokens=1, trace=object())  # half-built
    assert all(type(item) is type(gr.skip()) for item in inspector_tab.change_view("block-fam", broken))
    inspector_tab.stop_run(run)
    assert run.state == "done"  # a finished run is not "stopped"


def test_fast_blocks_redraw_at_a_bounded_rate(hub):
    import gradio as gr

    updates = _run(hub, redraw_seconds=3600.0)[1:]
    drawn = [type(u[1]) is not type(gr.skip()) for u in updates]
    assert drawn[0] and drawn[-1] and not any(drawn[1:-1])  # first and last block drawn, the rest: status only
    assert all("blocks" in u[0] for u in updates)  # but every block sends its progress


def test_stop_keeps_what_was_computed(hub):
    stream = inspector_tab.stream_document(hub, *_args(), redraw_seconds=0.0)
    live = next(stream).run
    next(stream)
    inspector_tab.change_view("block-memory", live)  # while streaming: the next block shows the new view
    assert next(stream).heatmap.layout.title.text == figures.SHARE_VIEWS["block-memory"].title
    stopped = inspector_tab.stop_run(live)
    assert stopped.status.startswith("**Stopped**") and live.state == "stopped"
    assert np.asarray(stopped.heatmap.data[0].z).shape[1] == 2  # the plots show every finished block
    assert list(stream) == []  # a stopped run yields nothing more
    assert live.blocks_done == 2 and live.trace.n_blocks == 2
    # Re-sent once Stop has finished, so a block update still in flight cannot leave "Streaming" showing.
    assert inspector_tab.settled_status(live) == stopped.status


def test_stop_during_a_block_waits_for_it_so_views_status_and_trace_agree(hub, monkeypatch):
    """A block cannot be interrupted: Stop pressed while one is computed draws it too (found by a new-user
    trial: the plots stopped one block short of the status and the downloaded trace)."""
    import re
    import threading

    from famviz.core.engine import Stream

    in_block, release = threading.Event(), threading.Event()
    original = Stream._run_block

    def slow_block(stream, chunk):  # the engine is inside a block until released
        in_block.set()
        release.wait(10)
        return original(stream, chunk)

    stream = inspector_tab.stream_document(hub, *_args(), redraw_seconds=0.0)
    live = next(stream).run
    next(stream)  # block 1 done
    monkeypatch.setattr(Stream, "_run_block", slow_block)
    worker = threading.Thread(target=lambda: next(stream, None))
    worker.start()
    assert in_block.wait(10)
    threading.Timer(0.3, release.set).start()  # the block finishes while Stop waits
    stopped = inspector_tab.stop_run(live)
    worker.join(10)
    assert live.blocks_done == live.trace.n_blocks == 2
    assert np.asarray(stopped.heatmap.data[0].z).shape[1] == 2  # the heatmap has both blocks
    assert re.search(r"\b2 / \d+ blocks", stopped.status), stopped.status  # and so has the status
    assert list(stream) == []


@pytest.mark.slow  # numba compiles UMAP on first use (~30 s)
def test_umap_is_computed_off_the_handler(hub):
    pytest.importorskip("umap")
    run = _run(hub)[-1].run
    figure, timer = inspector_tab.change_method("UMAP", run)
    assert run.method == "UMAP"
    assert figure.data  # something is drawn at once (PCA, or UMAP when already done)
    run.umap_future.result(timeout=300)
    figure, timer = inspector_tab.poll_umap(run)
    assert "UMAP" in figure.layout.xaxis.title.text


def test_export_download_and_replay(hub, tmp_path):
    run = _run(hub, compare="bswa")[-1].run
    path, note = inspector_tab.export_plot("nll", "html", run)
    assert Path(path).read_text().count("famviz-metadata") == 1 and "Exported" in note
    trace_path, note = inspector_tab.download_trace(run)
    assert trace_path.endswith(".npz") and "MB" in note
    replay = inspector_tab.replay_trace(trace_path, None)
    assert replay.status.startswith("**Replayed from trace**")
    replayed = replay.run
    np.testing.assert_allclose(np.asarray(replay[1].data[0].z), np.asarray(run.heatmap().data[0].z))
    assert replayed.compare_nll == pytest.approx(run.compare_nll)
    assert replayed.features.n_blocks == run.blocks_done
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a trace")
    status, *rest = inspector_tab.replay_trace(str(bad), replayed)
    assert status.startswith("**Error:**") and "trace" in status
    assert inspector_tab.export_plot("heatmap", "png", None)[1].startswith("Nothing to export")


def test_exports_caption_the_modes_they_show_and_name_mode_and_adapter(hub):
    """A heatmap exported from a fam-vs-bswa run was captioned "mode fam vs bswa" though it shows fam only,
    and no file name said mode or adapter."""
    import json
    import re

    run = _run(hub, compare="bswa")[-1].run
    for name, modes, stem in (
        ("heatmap", "mode fam ·", "famviz-heatmap-fam-untuned-pasted-text"),
        ("nll", "mode fam vs bswa ·", "famviz-nll-fam-vs-bswa-untuned-pasted-text"),
    ):
        path, _ = inspector_tab.export_plot(name, "html", run)
        assert Path(path).name == f"{stem}.html"
        content = re.search(r'name="famviz-metadata" content="([^"]*)"', Path(path).read_text()).group(1)
        caption = json.loads(html.unescape(content))["caption"]
        assert modes in caption and run.model_label in caption
    assert Path(inspector_tab.download_trace(run)[0]).name == "famviz-trace-fam-vs-bswa-untuned-pasted-text.npz"
    from famviz.viz import export

    assert export.adapter_tag("/x/smollm2-135m-fam64-block256-mem0-balanced") == "balanced"
    assert export.adapter_tag("my adapter") == "my-adapter" and export.adapter_tag(None) == "untuned"


def test_sessions_streaming_at_once_keep_their_own_runs(hub):
    """Two sessions' handlers running in parallel threads never mix their data."""
    other_text = " ".join(f"A completely different line {i} about cats." for i in range(30))
    results = {}

    def session(name, text, mode):
        results[name] = _run(hub, pasted=text, mode=mode)[-1].run

    threads = [
        threading.Thread(target=session, args=("a", TEXT, "fam")),
        threading.Thread(target=session, args=("b", other_text, "bswa")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results["a"], results["b"]
    assert a.trace is not b.trace
    assert a.trace.text == TEXT and b.trace.text == other_text
    assert a.config.mode == "fam" and b.config.mode == "bswa"
    solo = _run(hub, pasted=other_text, mode="bswa")[-1].run
    np.testing.assert_allclose(b.trace.array("tokens.nll"), solo.trace.array("tokens.nll"), rtol=1e-5)


# -- the served app, through gradio_client ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_served_app_streams_one_update_per_block(tiny_loaded, tmp_path):
    from gradio_client import Client, handle_file

    demo = launch.build_app(tiny_loaded)
    try:
        _, url, _ = demo.launch(
            server_name="127.0.0.1",
            server_port=_free_port(),
            prevent_thread_lock=True,
            quiet=True,
            share=False,
            max_file_size=inputs.MAX_UPLOAD,
        )
        client = Client(url, verbose=False)
        n_blocks = _n_blocks(tiny_loaded)
        doc = tmp_path / "doc.md"
        doc.write_text(TEXT)
        job = client.submit(
            "tiny",
            "",
            "auto",
            "auto",
            "upload",
            handle_file(str(doc)),
            None,
            300,
            "fam",
            "off",
            32,
            8,
            1,
            4096,
            "",
            api_name="/stream",
        )
        updates = list(job)
        statuses = [update[0] for update in updates]
        block_statuses = [s for s in statuses if s.startswith(("**Streaming**", "**Done**")) and " · 0 / " not in s]
        assert [s.split(" · ")[4] for s in block_statuses] == [
            f"{i} / {n_blocks} blocks" for i in range(1, n_blocks + 1)
        ], statuses
        assert statuses[-1].startswith("**Done**") and "doc.md" in statuses[-1]
        heatmap = updates[-1][1]
        assert heatmap is not None and heatmap["type"] == "plotly"
        assert 'class="cur"' in updates[-1][3]

        # Bad input: one message, the run does not start.
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"\x00\x01\x02 binary")
        result = client.predict(
            "tiny",
            "",
            "auto",
            "auto",
            "upload",
            handle_file(str(bad)),
            None,
            300,
            "fam",
            "off",
            32,
            8,
            1,
            4096,
            "",
            api_name="/stream",
        )
        assert result[0].startswith("**Error:**") and "binary" in result[0]

        # A fractional block size reaches the validator as typed (not rounded by the component).
        result = client.predict(
            "tiny", "", "auto", "auto", "paste", None, TEXT, 300, "fam", "off", 2.5, 8, 1, 4096, "", api_name="/stream"
        )
        assert result[0].startswith("**Error:**") and "Block size must be a whole number, got 2.5" in result[0]
    finally:
        demo.close()


SESSION_WORDS = ("apple", "river", "violin", "granite", "comet", "lantern", "meadow", "harbor")


@pytest.mark.slow
def test_load_eight_sessions_at_once_each_get_their_own_results_and_memory_returns(tiny_loaded):
    """Eight gradio_client sessions stream different documents at once: all finish, each sees only its own
    document (its last block's text, and the mean loss a solo run of it gives), the app's resident memory
    is back within 10% of its idle level afterwards, and a stopped session frees the model for the next."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from famviz.process import current_rss_mb, trim_heap

    def text_of(word: str, sentences: int = 60) -> str:
        return " ".join(f"The {word} session number {i} streams its own {word} text." for i in range(sentences))

    def stream(url: str, text: str, block: int = 32) -> list:
        client = Client(url, verbose=False)
        try:
            return list(
                client.submit(
                    "tiny",
                    "",
                    "auto",
                    "auto",
                    "paste",
                    None,
                    text,
                    300,
                    "fam",
                    "off",
                    block,
                    8,
                    1,
                    4096,
                    "",
                    api_name="/stream",
                )
            )
        finally:
            client.close()

    def settled_rss() -> float:
        gc.collect()
        trim_heap()
        return current_rss_mb()

    demo = launch.build_app(tiny_loaded)
    try:
        _, url, _ = demo.launch(
            server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True, share=False
        )
        stream(url, text_of("warm-up"))  # first-call costs are not a leak
        idle = settled_rss()
        with ThreadPoolExecutor(max_workers=len(SESSION_WORDS)) as pool:
            results = list(pool.map(lambda word: stream(url, text_of(word)), SESSION_WORDS))
        for word, updates in zip(SESSION_WORDS, results, strict=True):
            status, document_html = updates[-1][0], updates[-1][3]
            assert status.startswith("**Done**"), status
            assert word in document_html and not any(other in document_html for other in SESSION_WORDS if other != word)
            solo = _run(
                app_hub.ModelHub(tiny_loaded, None, ("tiny", None, "auto", "auto")),
                pasted=text_of(word),
                mode="fam",
                fam_len=8,
                mem_blocks=1,
            )[-1][0]
            assert status.split("mean NLL ")[1] == solo.split("mean NLL ")[1]
        after = settled_rss()
        assert after <= 1.10 * idle, f"resident memory {after:.0f} MB after the sessions, {idle:.0f} MB idle"

        # A stopped session frees the model: the next session's run starts and finishes.
        long_client = Client(url, verbose=False)
        job = long_client.submit(
            "tiny",
            "",
            "auto",
            "auto",
            "paste",
            None,
            text_of("endless", 2000),
            300,
            "fam",
            "off",
            4,
            8,
            1,
            100_000,
            "",
            api_name="/stream",
        )
        deadline = time.monotonic() + 120
        while not any(str(update[0]).startswith("**Streaming**") for update in job.outputs()):
            assert time.monotonic() < deadline, "the long run never started"
            time.sleep(0.05)  # until it holds the model
        job.cancel()
        assert stream(url, text_of("next"))[-1][0].startswith("**Done**")
        assert not any(str(update[0]).startswith("**Done**") for update in job.outputs())
        long_client.close()
    finally:
        demo.close()


def test_status_says_when_max_tokens_cut_the_document(hub):
    updates = _run(hub, max_tokens=40)
    status = updates[-1].status
    total = len(hub.default[0].tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert f"40 / 40 tokens (of {total:,} tokens: document cut at max tokens)" in status
    whole = _run(hub)[-1].status
    assert "document cut" not in whole


def test_document_cut_for_huge_documents_gives_the_character_share(hub):
    tokenizer = hub.default[0].tokenizer
    text = "word " * 1000
    assert (
        inputs.document_cut(tokenizer, text, [1, 2], [(0, 4), (5, 9)], count_up_to=100) == "0% of its 5,000 characters"
    )
    assert inputs.document_cut(tokenizer, "a b", [1, 2], [(0, 1), (2, 3)]) is None


def test_the_app_starts_on_the_shipped_tuned_adapter_unless_told_otherwise():
    from famviz.io.adapters import SHIPPED_ADAPTER

    shipped = app_hub.shipped_adapters()[0][1]  # listed first, too
    assert shipped == str(SHIPPED_ADAPTER) == launch.startup_adapter(None, None)
    assert launch.startup_adapter(None, "none") is None and launch.startup_adapter(None, "") is None
    assert launch.startup_adapter("my/model", None) is None  # no shipped adapter fits another model
    assert launch.startup_adapter(None, "/some/dir") == "/some/dir"


def test_runs_exports_and_traces_name_the_model_and_adapter(tmp_path):
    """Both the status and what leaves the app (figure caption and metadata, trace file) say which model and
    adapter produced a run; a geometry other than the adapter's runs, with a note; choosing an adapter in
    the Model panel fills in its geometry and says so; the header follows the choice."""
    from helpers import write_random_lora_adapter

    from famviz.core.trace import Trace
    from famviz.io.models import load_model
    from famviz.viz import export
    from famviz.viz.inspector import Run

    model_dir, adapter_dir = write_random_lora_adapter(tmp_path)
    startup = load_model(str(model_dir), device="cpu", dtype="float32")
    hub = app_hub.ModelHub(startup, None, app_hub.model_key(str(model_dir), "", "cpu", "float32"))
    common = dict(model=str(model_dir), device="cpu", dtype="float32", fam_len=4, mem_blocks=0)
    untuned = _run(hub, adapter="", **common)[-1]
    tuned = _run(hub, adapter=str(adapter_dir), **common)[-1]
    assert "(untuned conversion)" in untuned.status and "+ adapter adapter" in tuned.status
    assert "Note:" not in tuned.status
    run = tuned.run
    assert "+ adapter adapter" in run.caption() and export.metadata_of(run)["adapter"] == "adapter"
    path = run.trace.save(tmp_path / "run.npz")
    replayed = Run.from_trace(Trace.load(path), name="run.npz")
    assert "+ adapter adapter" in replayed.caption() and "+ adapter adapter" in replayed.status()

    other = _run(hub, adapter=str(adapter_dir), **dict(common, mem_blocks=1))[-1].status
    assert "**Note:** adapter adapter was trained with memory blocks 0, this run uses 1" in other
    short = _run(hub, adapter="", **dict(common, block_size=2))[-1].status
    assert "shorter than the FAM (4 slots)" in short

    *values, note = app_hub.adapter_geometry(2, str(adapter_dir))
    assert values == [32, 4, 0, 32, 4, 0] and "trained with block 32 tokens, FAM 4 slots, memory blocks 0" in note
    *kept, note = app_hub.adapter_geometry(1, "")
    assert "Untuned conversion" in note
    assert app_hub.adapter_geometry(1, str(tmp_path))[-1].startswith("**Error:**")

    header = app_hub.model_header(hub, str(model_dir), str(adapter_dir), "cpu", "float32")
    assert "adapter `adapter` (tuned FAM)" in header  # loaded by the run above
    assert "loaded on the next Start" in app_hub.model_header(hub, "other/model", "", "cpu", "float32")


def test_errors_are_repeated_beside_start_and_the_plots_are_explained(hub):
    assert inputs.error_status("boom").startswith(inputs.ERROR_MARK)  # what the page's JS looks for
    assert set(inspector_tab.PLOT_NOTES) == {"heatmap", "trajectory", "dynamics", "nll", "lens", "slots"}
    assert launch.warm_up(hub, FamConfig("fam", 32, 8, 1)) > 0  # runs the real stream handler


def test_the_warm_up_logs_nothing_about_its_own_run(hub, caplog):
    """Its status would read as a note on the user's settings ("this run uses block 64"); what other
    threads log meanwhile, and what is logged after it, still comes through."""
    with caplog.at_level(logging.INFO):
        launch.warm_up(hub, FamConfig("fam", 32, 8, 1))
        assert not [r for r in caplog.records if r.name.startswith("famviz") and r.levelno < logging.WARNING]
        logging.getLogger("famviz.app").info("after the warm-up")
    assert [r.getMessage() for r in caplog.records] == ["after the warm-up"]
    assert not any(isinstance(f, launch._WarmUpQuiet) for h in logging.getLogger().handlers for f in h.filters)


def test_a_run_asked_for_during_the_background_warm_up_waits_for_it(hub, caplog):
    release, order = threading.Event(), []

    def slow_warm_up():
        order.append("warm-up starts")
        assert hub.default  # the warm-up's own thread does not wait for itself
        release.wait(10)
        order.append("warm-up ends")

    warming = hub.warm_up_in_background(slow_warm_up)
    user = threading.Thread(target=lambda: (hub.default, order.append("the user's run gets the model")))
    user.start()
    user.join(0.3)
    assert user.is_alive()  # waiting
    release.set()
    user.join(10)
    warming.join(10)
    assert order == ["warm-up starts", "warm-up ends", "the user's run gets the model"]

    def failing_warm_up():
        raise RuntimeError("no memory")

    with caplog.at_level(logging.WARNING):
        hub.warm_up_in_background(failing_warm_up).join(10)
    assert hub.default and "the warm-up failed" in caplog.text  # the app serves on, nothing waits for ever

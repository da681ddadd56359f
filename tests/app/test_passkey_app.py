"""The app's PassKey tab handlers (famviz.app.passkey_tab), called directly on a tiny random model with
the bundled tokenizer; the served tab through gradio_client on the bundled model (slow)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from helpers import bundled_tokenizer, tiny_causal_lm

from famviz import prepare_model
from famviz.app import hub as app_hub
from famviz.app import launch
from famviz.app import passkey_tab as tab

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def context():
    tokenizer = bundled_tokenizer()
    loaded = prepare_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer, name="tiny-vocab")
    return SimpleNamespace(hub=SimpleNamespace(default=(loaded, None)))


def test_retention_yields_once_per_block_and_keeps_the_curve(context):
    updates = list(tab.watch_retention(context, "fam", 0, 32, 4, 300, 0.0, 2, tab.FILLER, None, 1, None))
    status, figure, session = updates[-1]
    blocks = -(-(300 - 11) // 32)  # haystack = prompt minus the question line
    assert len(updates) in (blocks + 1, blocks + 2)  # a start message, one per block, a final summary
    assert "Done" in status and session.key is not None
    assert len(session.points) >= 3 and [p.blocks_since_key for p in session.points][:3] == [0, 2, 4]
    assert list(figure.data[0].x) == [p.blocks_since_key for p in session.points]


def test_retention_in_an_uploaded_document(context, tmp_path, gpl_text):
    path = tmp_path / "doc.txt"
    path.write_text(gpl_text)
    updates = list(tab.watch_retention(context, "bswa", 1, 64, 4, 400, 0.5, 1, tab.UPLOAD, str(path), 0, None))
    assert "Done" in updates[-1].status


@pytest.mark.parametrize(
    "args, message",
    [
        (("fam", 0, 32, 4, 300, 2.0, 1, tab.FILLER, None, 0), "Depth"),
        (("fam", 0, 32, 4, "x", 0.0, 1, tab.FILLER, None, 0), "Length"),
        (("fam", 0, 32, 4, 300, 0.0, 1, tab.UPLOAD, None, 0), "No document uploaded"),
        (("fam", 0, 0, 4, 300, 0.0, 1, tab.FILLER, None, 0), "Block size"),
        (("fam", 0, 32, 4, 64, 0.0, 1, tab.FILLER, None, 0), "shorter than the prompt"),
    ],
)
def test_bad_retention_input_is_a_message_and_keeps_the_session(context, args, message):
    previous = tab.PasskeySession(points=["kept"])
    updates = list(tab.watch_retention(context, *args, previous))
    assert len(updates) == 1 and message in updates[0].status and "Error" in updates[0].status
    assert updates[0].session.points == ["kept"]


def test_after_an_error_each_panel_still_says_what_its_plot_shows(context):
    """An error replaced the status line, so the kept curve, heatmap and interventions lost what made them;
    the error's paragraph comes first (it alone is repeated beside the button), the caption under it."""
    from famviz.app.inputs import PLOTS_STILL_SHOW

    session = list(tab.watch_retention(context, "fam", 0, 32, 4, 300, 0.0, 2, tab.FILLER, None, 1, None))[-1].session
    session = list(tab.run_sweep(context, ["fam:0"], "200", "0", 1, 64, 4, 0, session))[-1].session
    session = list(tab.run_interventions_tab(context, "ablate", 200, 0.0, 1, "0", "last", 64, 4, 0, session))[
        -1
    ].session
    failed = {
        "retention": tab.watch_retention(context, "fam", 0, 32, 4, "x", 0.0, 2, tab.FILLER, None, 1, session),
        "sweep": tab.run_sweep(context, ["fam:0"], "x", "0", 1, 64, 4, 0, session),
        "interventions": tab.run_interventions_tab(context, "ablate", "x", 0.0, 1, "0", "last", 64, 4, 0, session),
    }
    for panel, updates in failed.items():
        status = list(updates)[-1].status
        error, kept = status.split("\n\n", 1)
        assert error.startswith("**Error:**") and "Length" in error
        assert kept == f"{PLOTS_STILL_SHOW} {session.caption(panel)}" and session.caption(panel)
    assert tab.PasskeySession().error("sweep", "boom") == "**Error:** boom"  # nothing shown: the error alone


def test_sweep_fills_the_heatmap_trial_by_trial(context, tmp_path):
    updates = list(tab.run_sweep(context, ["fam:0", "bswa:0"], "200, 300", "0,1", 2, 64, 4, 0, None))
    status, heatmap, table, sweeps, session = updates[-1]
    assert "Done" in status and len(session.cells) == 8 and len(table["value"]) == 8
    assert len(updates) == 1 + 16 + 1  # start, one per trial, done
    partial = updates[1].heatmap
    assert sum(1 for v in partial.data[0].z.flatten() if v == v) == 1  # one cell drawn after the first trial
    assert {trace.zmax for trace in heatmap.data} == {1.0}
    file, note = tab.download_results(session)
    assert Path(file).read_text().startswith("{") and "8 cells" in note
    file, note = tab.export_passkey("heatmap", "html", session)
    assert Path(file).stat().st_size > 10_000 and "Exported" in note


def test_sweeps_are_kept_labelled_and_name_what_made_them(context, monkeypatch):
    """A new sweep replaced the last one, and neither its heatmap nor its table said which model made
    it: the last KEPT_SWEEPS stay, each labelled, one shown; exports name mode and adapter."""
    monkeypatch.setattr(tab, "KEPT_SWEEPS", 2)
    session = None
    for modes in (["fam:0"], ["bswa:0"], ["full"]):
        updates = list(tab.run_sweep(context, modes, "200", "0", 1, 64, 4, 0, session))
        session = updates[-1].session
    status, heatmap, table, sweeps, _ = updates[0]  # the start of the third sweep
    assert [s.number for s in session.sweeps] == [2, 3] and session.shown_sweep == 3  # the first one went
    labels = [label for label, _ in sweeps["choices"]]
    assert sweeps["value"] == 3 and len(labels) == 2
    assert labels[0].startswith("sweep 3 (") and "tiny-vocab (untuned conversion) · full · 200 tokens" in labels[0]
    assert "bswa (mem 0)" in labels[1]
    heatmap, table = updates[-1].heatmap, updates[-1].table
    assert "tiny-vocab (untuned conversion)" in heatmap.layout.title.text
    assert table["label"] == f"Cells of {labels[0]}" and table["value"][0][0] == "full"
    heatmap, table = tab.show_sweep(2, session)  # an earlier sweep, shown again
    assert table["value"][0][0] == "bswa (mem 0)" and session.cells[0].label == "bswa (mem 0)"
    assert tab.show_sweep(1, session) == (tab.gr.skip(), tab.gr.skip())  # no longer kept
    file, _ = tab.export_passkey("heatmap", "html", session)
    assert Path(file).name == "famviz-passkey-heatmap-bswa0-untuned.html"
    assert "tiny-vocab (untuned conversion)" in Path(file).read_text()
    assert Path(tab.download_results(session)[0]).name == "famviz-passkey-sweep-bswa0-untuned.json"
    session = list(tab.watch_retention(context, "bswa", 1, 32, 4, 300, 0.0, 2, tab.FILLER, None, 1, session))[
        -1
    ].session
    assert (
        Path(tab.export_passkey("retention", "html", session)[0]).name == "famviz-passkey-retention-bswa1-untuned.html"
    )
    # While another kept sweep is shown, a running sweep leaves the heatmap and table alone.
    running = tab.run_sweep(context, ["fam:0"], "200", "0", 1, 64, 4, 0, session)
    next(running)
    tab.show_sweep(3, session)
    assert all(update[1] == tab.gr.skip() for update in running)


def test_bad_sweep_input(context):
    for args, message in [
        (([], "200", "0", 1), "at least one mode"),
        ((["fam:0"], "2k", "0", 1), "Lengths"),
        ((["fam:0"], "200", "0,2", 1), "Depths"),
        ((["fam:0"], "200", "0", 0), "Trials"),
    ]:
        updates = list(tab.run_sweep(context, *args, 64, 4, 0, None))
        assert len(updates) == 1 and message in updates[0].status
    assert "Nothing to export" in tab.export_passkey("heatmap", "svg", None)[1]


def test_interventions_fill_their_heatmap_and_export(context, monkeypatch):
    monkeypatch.setattr(tab, "REDRAW_SECONDS", 0.0)
    updates = list(tab.run_interventions_tab(context, "write-time", 200, 0.0, 1, "0,1", "last", 64, 4, 0, None))
    status, figure, session = updates[-1]
    assert "Done" in status and "clean" in status
    assert session.intervention["layers"] == [0, 1, "all"] and session.intervention["blocks"] == [1, 2]
    assert len(updates) == 1 + 6 + 1  # start, one per cell (3 rows x 2 blocks), done
    first = updates[1].plot.data[0].z
    assert sum(1 for row in first for v in row if v == v) == 1  # the first cell drawn alone
    assert session.intervention["config"]["adapter"] is None and session.intervention_caption.startswith("tiny-vocab")
    file, note = tab.export_passkey("interventions", "html", session)
    assert Path(file).stat().st_size > 10_000 and "Exported" in note


@pytest.mark.parametrize(
    "args, message",
    [
        (("sideways", 200, 0.0, 1, "", "last"), "--method"),
        (("ablate", "x", 0.0, 1, "", "last"), "Length"),
        (("ablate", 200, 2.0, 1, "", "last"), "Depth must be from 0 to 1"),
        (("ablate", 200, 0.0, 1, "0,99", "last"), "layers must be"),
        (("patch", 60, 0.0, 1, "", "last"), "Length"),
    ],
)
def test_bad_intervention_input_is_a_message(context, args, message):
    updates = list(tab.run_interventions_tab(context, *args, 64, 4, 0, tab.PasskeySession(points=["kept"])))
    assert len(updates) == 1 and message in updates[0].status and "Error" in updates[0].status
    assert updates[0].session.points == ["kept"]


@pytest.mark.slow
def test_served_passkey_tab_streams_a_retention_curve(bundled_fast):
    """The real app on the bundled model: the retention event yields one update per block."""
    from gradio_client import Client

    demo = launch.build_app(bundled_fast)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        client = Client(url, verbose=False)
        job = client.submit(
            "", "", "auto", "auto", "full", 0, 128, 64, 600, 0.0, 1, tab.FILLER, None, 0, api_name="/passkey_retention"
        )
        updates = list(job)
        assert len(updates) >= 5
        status = updates[-1][0]  # over the API: the panel's outputs in order, the session state left out
        assert "retrieved in" in status and "retrieved in **" in status
    finally:
        demo.close()


def test_the_app_offers_the_shipped_adapter():
    from famviz.io.adapters import read_adapter

    shipped = app_hub.shipped_adapters()
    assert shipped and all("tuned FAM" in label for label, _ in shipped)
    for _, directory in shipped:
        assert read_adapter(directory).meta["model_type"] == "llama"


def test_both_tabs_run_the_model_and_adapter_chosen_in_the_model_panel(tmp_path):
    """The PassKey tab follows the Model panel: with an adapter chosen, retention and sweep differ from the
    untuned run, and every status and result names the model and adapter that produced it."""

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from helpers import write_random_lora_adapter

    from famviz.io.models import load_model

    model_dir, adapter_dir = write_random_lora_adapter(tmp_path)
    startup = load_model(str(model_dir), device="cpu", dtype="float32")
    hub = app_hub.ModelHub(startup, None, app_hub.model_key(str(model_dir), "", "cpu", "float32"))
    context = SimpleNamespace(hub=hub)
    runs = {}
    for name, adapter in (("untuned", ""), ("tuned", str(adapter_dir))):
        choice = (str(model_dir), adapter, "cpu", "float32")
        updates = list(
            tab.watch_retention(context, "fam", 0, 32, 4, 300, 0.0, 1, tab.FILLER, None, 1, None, model_choice=choice)
        )
        status, _, session = updates[-1]
        sweep = list(tab.run_sweep(context, ["fam:0"], "200", "0", 1, 32, 4, 0, None, model_choice=choice))[-1]
        runs[name] = (status, [p.key_logprob for p in session.points], session.retention_caption, sweep)
    assert "untuned conversion" in runs["untuned"][0] and "adapter adapter" in runs["tuned"][0]
    assert "adapter adapter" in runs["tuned"][2] and "untuned conversion" in runs["untuned"][2]
    assert runs["tuned"][1] != runs["untuned"][1]  # the adapter changed what the memory holds
    tuned_sweep, untuned_sweep = runs["tuned"][3].session, runs["untuned"][3].session
    assert tuned_sweep.sweep.config["adapter"] == str(adapter_dir) and untuned_sweep.sweep.config["adapter"] is None
    assert tuned_sweep.cells[0].mean_key_logprob != untuned_sweep.cells[0].mean_key_logprob
    assert (
        "adapter adapter" in runs["tuned"][3].status and "untuned conversion" in runs["untuned"][3].status
    )  # the sweep's status
    assert "Note:" not in runs["tuned"][0]  # the adapter's own geometry: nothing to note
    # Another geometry than the adapter's runs, and the status says so.
    other = list(
        tab.watch_retention(
            context,
            "fam",
            1,
            32,
            4,
            300,
            0.0,
            1,
            tab.FILLER,
            None,
            1,
            None,
            model_choice=(str(model_dir), str(adapter_dir), "cpu", "float32"),
        )
    )[-1].status
    assert "adapter adapter was trained with memory blocks 0, this run uses 1" in other

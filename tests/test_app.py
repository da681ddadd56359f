"""The app (app.py) and its figures (famviz/figures.py).

Fast: figure functions on tiny numpy arrays; the app's input checks; its stream handler called
directly on a tiny random model. Slow: the served app driven through gradio_client.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from famviz import figures  # noqa: E402
from famviz.trace import Trace  # noqa: E402

GPL3 = Path("/usr/share/common-licenses/GPL-3")


# -- figures on tiny arrays -----------------------------------------------------------------------------
def _share(blocks=3, layers=2, heads=4, groups=3, seed=0):
    raw = np.random.default_rng(seed).random((blocks, layers, heads, groups)).astype(np.float32)
    return raw / raw.sum(-1, keepdims=True)


def _colorbar_title(trace) -> str:
    return trace.colorbar.title.text


def test_share_heatmap_is_layer_by_block_mean_over_heads_on_a_fixed_scale():
    share = _share()
    fig = figures.share_heatmap(share, "memory")
    heat = fig.data[0]
    z = np.asarray(heat.z)
    assert z.shape == (2, 3)  # layers × blocks
    np.testing.assert_allclose(z, share[..., 1].mean(axis=2).T, rtol=1e-6)
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert "memory" in _colorbar_title(heat)
    assert fig.layout.xaxis.title.text == "block"
    assert fig.layout.yaxis.title.text == "layer"
    assert fig.layout.title.text


def test_share_heatmap_fam_groups_and_layer_labels():
    share = _share(groups=2)
    fig = figures.share_heatmap(share, "block", groups=figures.FAM_GROUPS, layers=[5, 7], block_starts=[0, 4, 8])
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z), share[..., 1].mean(axis=2).T, rtol=1e-6)
    assert list(heat.y) == [5, 7]
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)


@pytest.mark.parametrize("shape, group", [((3, 2, 4), "fam"), ((3, 2, 4, 2), "fam"), ((3, 2, 4, 3), "nope")])
def test_share_heatmap_refuses_bad_shapes_and_groups(shape, group):
    with pytest.raises(ValueError):
        figures.share_heatmap(np.zeros(shape), group)


def test_every_share_view_has_a_known_channel_and_group():
    for key, view in figures.SHARE_VIEWS.items():
        assert view.key in ("block.share", "fam.share")
        assert view.group in view.groups, key
        assert view.label and view.title


def _trace(blocks=3, layers=2, heads=4, block=4, fam=True) -> Trace:
    kinds = {"tokens.nll": [], "block.share": list(range(layers))}
    if fam:
        kinds.update({"fam.share": list(range(layers)), "fam.norm": list(range(layers)),
                      "fam.update": list(range(layers))})
    trace = Trace({}, kinds)
    rng = np.random.default_rng(1)
    for b in range(blocks):
        values = {"tokens.nll": rng.random(block).astype(np.float32),
                  "block.share": _share(1, layers, heads, 3, seed=b)[0]}
        if fam:
            values["fam.share"] = _share(1, layers, heads, 2, seed=b)[0]
            values["fam.norm"] = rng.random(layers).astype(np.float32)
            values["fam.update"] = rng.random(layers).astype(np.float32)
        trace.append_block(b * block, list(range(block)), values)
    return trace


def test_view_figure_from_a_trace():
    trace = _trace()
    for view in figures.SHARE_VIEWS:
        fig = figures.view_figure(trace, view)
        assert np.asarray(fig.data[0].z).shape == (2, 3)
        assert fig.layout.title.text == figures.SHARE_VIEWS[view].title


def test_view_figure_without_fam_says_so():
    fig = figures.view_figure(_trace(fam=False), "fam-block")
    assert not fig.data
    assert "fam mode" in fig.layout.annotations[0].text
    assert figures.view_figure(_trace(fam=False), "block-fam").data  # BSWA still has (zero) FAM shares


def test_block_means_ignore_nan_and_keep_empty_blocks_nan():
    nll = np.array([np.nan, 1.0, 3.0, np.nan, np.nan, 2.0, 4.0])
    means = figures.block_means(nll, [0, 3, 5])
    np.testing.assert_allclose(means[[0, 2]], [2.0, 3.0])
    assert np.isnan(means[1])


def test_nll_per_block_line():
    nll = np.array([np.nan, 1.0, 3.0, 5.0, 7.0], dtype=np.float32)
    fig = figures.nll_per_block(nll, [0, 3])
    line = fig.data[0]
    np.testing.assert_allclose(np.asarray(line.y), [2.0, 6.0])
    assert list(line.x) == [0, 1]
    assert fig.layout.xaxis.title.text == "block"
    assert "NLL" in fig.layout.yaxis.title.text


def test_fam_dynamics_two_labelled_heatmaps():
    norm = np.arange(6, dtype=np.float32).reshape(3, 2)  # (blocks, layers)
    update = norm / 10
    fig = figures.fam_dynamics(norm, update)
    assert len(fig.data) == 2
    np.testing.assert_allclose(np.asarray(fig.data[0].z), norm.T)
    np.testing.assert_allclose(np.asarray(fig.data[1].z), update.T)
    assert [_colorbar_title(t) for t in fig.data] == ["norm", "update"]
    assert fig.layout.xaxis2.title.text == "block"
    assert fig.layout.yaxis.title.text == fig.layout.yaxis2.title.text == "layer"
    with pytest.raises(ValueError):
        figures.fam_dynamics(norm, update[:2])


def test_fam_figure_from_traces():
    assert len(figures.fam_figure(_trace()).data) == 2
    fig = figures.fam_figure(_trace(fam=False))
    assert not fig.data and "fam mode" in fig.layout.annotations[0].text


def test_figures_of_a_single_block():
    trace = _trace(blocks=1)
    assert np.asarray(figures.view_figure(trace, "block-fam").data[0].z).shape == (2, 1)
    assert len(figures.nll_per_block(trace.array("tokens.nll"), trace.block_starts).data[0].y) == 1
    assert np.asarray(figures.fam_figure(trace).data[0].z).shape == (2, 1)


# -- the app's inputs (no model) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_module():
    import app

    return app


def test_command_line_options(app_module):
    parser = app_module.build_parser()
    args = parser.parse_args([])
    assert (args.model, args.adapter, args.device, args.dtype, args.host, args.port) == \
        (None, None, "auto", "auto", "127.0.0.1", 7860)
    help_text = parser.format_help()
    for option in ("--model", "--adapter", "--device", "--dtype", "--host", "--port"):
        assert option in help_text


def test_parse_settings(app_module):
    config, limit = app_module.parse_settings("bswa", 32, 0, 2, 100.0)
    assert (config.mode, config.block_size, config.fam_len, config.mem_blocks, limit) == ("bswa", 32, 0, 2, 100)
    config, _ = app_module.parse_settings("full", 32, None, 0, 100)  # FAM length is unused outside fam mode
    assert config.active_fam_len == 0


@pytest.mark.parametrize("settings, words", [
    (("fam", None, 64, 1, 4096), "Block size is empty"),
    (("fam", 0, 64, 1, 4096), "Block size must be from 1"),
    (("fam", 2.5, 64, 1, 4096), "whole number"),
    (("fam", 256, 0, 1, 4096), "FAM length must be from 1"),
    (("fam", 256, 64, -1, 4096), "Memory blocks must be from 0"),
    (("fam", 256, 64, 1, 0), "Max tokens must be from 1"),
    (("sparse", 256, 64, 1, 4096), "mode must be one of"),
])
def test_bad_settings_are_one_clear_message(app_module, settings, words):
    from famviz.errors import FamvizError

    with pytest.raises(FamvizError, match=words):
        app_module.parse_settings(*settings)


def test_documents_from_each_source(app_module, tmp_path):
    from famviz.errors import FamvizError

    doc = tmp_path / "notes.md"
    doc.write_text("# Title\r\nSome text.\r\n")
    assert app_module.read_input_document("upload", str(doc), None) == ("# Title\nSome text.\n", "notes.md")
    assert app_module.read_input_document("paste", None, "a\r\nb") == ("a\nb", "pasted text")
    if GPL3.exists():
        text, name = app_module.read_input_document("example", None, None)
        assert "GNU GENERAL PUBLIC LICENSE" in text and name
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin1 = tmp_path / "old.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    for source, upload, pasted, words in [
        ("upload", None, None, "No file uploaded"),
        ("paste", None, "  \n ", "No text pasted"),
        ("upload", str(binary), None, "binary file"),
        ("upload", str(empty), None, "empty"),
        ("upload", str(latin1), None, "not valid UTF-8"),
        ("somewhere", None, None, "Unknown document source"),
    ]:
        with pytest.raises(FamvizError, match=words):
            app_module.read_input_document(source, upload, pasted)


# -- the stream handler on a tiny random model --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded():
    import torch
    import transformers

    import famviz

    tokenizer = transformers.AutoTokenizer.from_pretrained(famviz.models.bundled_model_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).float()
    return famviz.prepare_model(model, tokenizer, "tiny")


TEXT = " ".join(f"Sentence number {i} says something about memory and attention." for i in range(40))


def test_tokenize_prefix_equals_the_whole_document(tiny_loaded, app_module):
    from famviz import tokenize_document

    text = GPL3.read_text() if GPL3.exists() else TEXT * 20
    whole, whole_offsets = tokenize_document(tiny_loaded.tokenizer, text)
    for limit in (1, 700, len(whole), len(whole) + 10):
        ids, offsets = app_module.tokenize_prefix(tiny_loaded.tokenizer, text, limit, piece_chars=2000)
        assert ids == whole[:limit] and offsets == whole_offsets[:limit]


def _run(app_module, loaded, **kwargs):
    args = dict(source="paste", upload=None, pasted=TEXT, mode="fam", block_size=32, fam_len=8, mem_blocks=1,
                max_tokens=4096, view="block-fam", previous=None)
    args.update(kwargs)
    return list(app_module.stream_document(loaded, None, *args.values()))


@pytest.mark.parametrize("mode", ["fam", "bswa", "full"])
def test_stream_yields_once_per_block(tiny_loaded, app_module, mode):
    from famviz import tokenize_document

    n_tokens = len(tokenize_document(tiny_loaded.tokenizer, TEXT)[0])
    updates = _run(app_module, tiny_loaded, mode=mode)
    assert len(updates) == -(-n_tokens // 32)
    status, heatmap, nll, fam, run = updates[-1]
    assert status.startswith("**Done**") and f"{len(updates)} / {len(updates)} blocks" in status
    assert np.asarray(heatmap.data[0].z).shape == (2, len(updates))
    assert len(nll.data[0].y) == len(updates)
    assert run.trace.n_tokens == n_tokens and run.trace.text == TEXT
    assert bool(fam.data) == (mode == "fam")
    first = updates[0][0]
    assert first.startswith("**Streaming**") and "tokens/s" in first and "elapsed" in first


def test_stream_respects_max_tokens(tiny_loaded, app_module):
    updates = _run(app_module, tiny_loaded, max_tokens=70)
    assert len(updates) == 3  # 32 + 32 + 6 tokens
    assert updates[-1][4].trace.n_tokens == 70


@pytest.mark.parametrize("kwargs, words", [
    (dict(pasted=""), "No text pasted"),
    (dict(block_size=-3), "Block size"),
    (dict(source="upload"), "No file uploaded"),
])
def test_stream_errors_are_one_status_and_keep_the_plots(tiny_loaded, app_module, kwargs, words):
    import gradio as gr

    updates = _run(app_module, tiny_loaded, **kwargs)
    assert len(updates) == 1
    status, *rest = updates[0]
    assert status.startswith("**Error:**") and words in status
    skip = gr.skip()
    assert all(type(item) is type(skip) and item == skip for item in rest)


def test_view_change_and_stop_act_on_the_run(tiny_loaded, app_module):
    run = _run(app_module, tiny_loaded)[-1][4]
    fig = app_module.change_view("fam-block", run)
    assert run.view == "fam-block" and fig.layout.title.text == figures.SHARE_VIEWS["fam-block"].title
    app_module.stop_run(run)
    assert run.state == "done"  # a finished run is not "stopped"

    stream = app_module.stream_document(tiny_loaded, None, "paste", None, TEXT, "fam", 32, 8, 1, 4096, "block-fam",
                                        None)
    first = next(stream)
    live = first[4]
    assert first[1].layout.title.text == figures.SHARE_VIEWS["block-fam"].title
    app_module.change_view("block-memory", live)  # while streaming: the next block shows the new view
    assert next(stream)[1].layout.title.text == figures.SHARE_VIEWS["block-memory"].title
    assert app_module.stop_run(live).startswith("**Stopped**") and live.state == "stopped"
    assert list(stream) == []  # a stopped run yields nothing more
    assert live.blocks_done == 2


# -- the served app, through gradio_client ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_served_app_streams_one_update_per_block(tiny_loaded, app_module, tmp_path):
    from gradio_client import Client, handle_file

    from famviz import tokenize_document

    demo = app_module.build_app(tiny_loaded)
    try:
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                                quiet=True, share=False, max_file_size="50mb")
        client = Client(url, verbose=False)
        n_blocks = -(-len(tokenize_document(tiny_loaded.tokenizer, TEXT)[0]) // 32)
        started = time.perf_counter()
        job = client.submit("paste", None, TEXT, "fam", 32, 8, 1, 4096, "block-fam", api_name="/stream")
        updates = list(job)
        assert time.perf_counter() - started < 120
        statuses = [update[0] for update in updates]
        assert n_blocks <= len(updates) <= n_blocks + 1, statuses
        assert [s.split(" · ")[3] for s in statuses[:n_blocks]] == \
            [f"{i} / {n_blocks} blocks" for i in range(1, n_blocks + 1)]
        assert statuses[-1].startswith("**Done**")
        heatmap = updates[-1][1]
        assert heatmap is not None and heatmap["type"] == "plotly"

        # Bad input: one message, the run does not start.
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"\x00\x01\x02 binary")
        result = client.predict("upload", handle_file(str(bad)), None, "fam", 32, 8, 1, 4096, "block-fam",
                                api_name="/stream")
        assert result[0].startswith("**Error:**") and "binary" in result[0]
    finally:
        demo.close()

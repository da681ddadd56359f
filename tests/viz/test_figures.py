"""Figure factories (famviz/viz/figures.py) and the inspector's model-free views (famviz/viz/inspector.py),
on tiny numpy arrays and hand-built traces: no model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from famviz.core.config import FamConfig
from famviz.core.modes import FAM_GROUPS
from famviz.core.trace import Trace
from famviz.viz import figures, inspector


def _share(blocks=3, layers=2, heads=4, groups=4, seed=0):
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
    fig = figures.share_heatmap(share, "block", groups=FAM_GROUPS, layers=[5, 7], block_starts=[0, 4, 8])
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
        kinds.update(
            {"fam.share": list(range(layers)), "fam.norm": list(range(layers)), "fam.update": list(range(layers))}
        )
    trace = Trace({}, kinds)
    rng = np.random.default_rng(1)
    for b in range(blocks):
        values = {
            "tokens.nll": rng.random(block).astype(np.float32),
            "block.share": _share(1, layers, heads, 4, seed=b)[0],
        }
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


def test_each_mode_has_its_own_default_view_and_names_the_views_it_lacks():
    """Sink mode opened on the FAM view, all zeros and no word of why."""
    config = dict(block_size=4, fam_len=3)
    expected = {
        FamConfig("fam", mem_blocks=0, **config): ("block-fam", {"block-memory", "block-sink"}),
        FamConfig("sink", mem_blocks=1, **config): ("block-sink", {"block-fam", "fam-block"}),
        FamConfig("bswa", mem_blocks=1, **config): ("block-memory", {"block-fam", "fam-block", "block-sink"}),
        FamConfig("bswa", mem_blocks=0, **config): (
            "block-block",
            {"block-fam", "fam-block", "block-sink", "block-memory"},
        ),
        FamConfig("full", mem_blocks=0, **config): ("block-memory", {"block-fam", "fam-block", "block-sink"}),
        FamConfig("sink", mem_blocks=0, sink_tokens=0, **config): (
            "block-block",
            {"block-sink", "block-memory", "block-fam", "fam-block"},
        ),
    }
    for run_config, (default, lacking) in expected.items():
        assert figures.default_view(run_config) == default, run_config
        assert {v for v in figures.SHARE_VIEWS if figures.missing_view(run_config, v)} == lacking, run_config
        assert figures.missing_view(run_config, default) is None
    message = figures.missing_view(FamConfig("sink", **config), "block-fam")
    assert message == "sink mode has no FAM (only fam mode has one): pick “Block queries → sink tokens”"
    # A replayed (or exported) sink trace opens on its sink tokens; a view it lacks is a message in the plot.
    trace = _trace(fam=False)
    trace.meta["config"] = FamConfig("sink", **config).to_dict()
    run = inspector.Run.from_trace(trace, name="sink.npz")
    assert run.view == "block-sink" and run.heatmap().data
    run.view = "block-fam"
    for figure in (run.heatmap(), run.heads()):
        assert not figure.data and "sink mode has no FAM" in figure.layout.annotations[0].text


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


# -- long documents stay bounded -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 240, 241, 1000, 100_000])
def test_block_bins_cover_every_block_once_and_bound_the_columns(n):
    edges = figures.block_bins(n, max_columns=240, recent=120)
    assert edges[0] == 0 and edges[-1] == n
    assert np.all(np.diff(edges) >= 1)
    assert len(edges) - 1 == min(n, len(edges) - 1) <= 240
    if n > 240:  # the latest blocks keep a column each
        np.testing.assert_array_equal(np.diff(edges)[-120:], 1)


def test_long_heatmap_is_binned_with_means():
    share = _share(blocks=1000, layers=2, heads=1, groups=4)
    fig = figures.share_heatmap(share, "fam", max_columns=100)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (2, 100)
    edges = figures.block_bins(1000, 100)
    np.testing.assert_allclose(z[:, 0], share[edges[0] : edges[1], :, 0, 0].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(z[:, -1], share[-1, :, 0, 0], rtol=1e-6)
    assert "bin mean" in fig.data[0].hovertemplate


def test_selected_block_is_framed():
    fig = figures.share_heatmap(_share(blocks=5), "fam", selected_block=3)
    (frame,) = fig.layout.shapes
    assert (frame.x0, frame.x1) == (2.5, 3.5)
    assert not figures.share_heatmap(_share(blocks=5), "fam").layout.shapes


def test_head_share_heatmap_is_layer_by_head():
    block_share = _share(blocks=1, layers=3, heads=4)[0]
    fig = figures.head_share_heatmap(block_share, "memory", layers=[0, 5, 9], block=2, selected_layer=5)
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z), block_share[..., 1])
    assert np.asarray(heat.z).shape == (3, 4)
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert "memory" in heat.colorbar.title.text
    assert fig.layout.shapes[0].y0 == 4.5 and fig.layout.shapes[0].y1 == 5.5
    with pytest.raises(ValueError):
        figures.head_share_heatmap(block_share[0], "fam")


def test_head_view_figure_of_a_trace():
    trace = _trace()
    fig = figures.head_view_figure(trace, "fam-block", 1)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), trace.array("fam.share")[1][..., 1])
    assert "Block 1" in fig.layout.title.text
    assert not figures.head_view_figure(trace, "block-fam", 7).data


def test_nll_compare_has_two_lines_and_the_benefit():
    fam, bswa = np.array([3.0, 2.0, 1.5]), np.array([3.0, 2.5, 2.5])
    fig = figures.nll_compare(fam, bswa, "fam", "bswa")
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [t.name for t in lines] == ["fam", "bswa"]
    (bar,) = [t for t in fig.data if t.type == "bar"]
    np.testing.assert_allclose(np.asarray(bar.y), [0.0, 0.5, 1.0])
    assert fig.layout.xaxis2.title.text == "block"
    assert "benefit" in fig.layout.yaxis2.title.text
    with pytest.raises(ValueError):
        figures.nll_compare(fam, bswa[:2], "fam", "bswa")


def test_fam_trajectory_one_path_per_layer_with_latest_ringed():
    coords = {0: np.arange(10, dtype=np.float32).reshape(5, 2), 7: -np.ones((5, 2), np.float32)}
    fig = figures.fam_trajectory(coords, method="PCA")
    paths = [t for t in fig.data if t.name]
    assert [t.name for t in paths] == ["layer 0", "layer 7"]
    np.testing.assert_allclose(np.asarray(paths[0].x), coords[0][:, 0])
    assert list(paths[0].customdata) == [0, 1, 2, 3, 4]
    assert fig.layout.xaxis.title.text.startswith("PCA 1<br>") and fig.layout.yaxis.title.text == "PCA 2"
    assert "ringed = latest" in fig.layout.xaxis.title.text and not fig.layout.annotations  # the marker key
    rings = [t for t in fig.data if not t.name]
    assert len(rings) == 2 and list(rings[0].x) == [8.0]
    with pytest.raises(ValueError):
        figures.fam_trajectory({0: np.zeros((3, 3))})


def test_fam_trajectory_thins_long_histories_but_keeps_the_latest():
    coords = {0: np.random.default_rng(0).random((5000, 2)).astype(np.float32)}
    fig = figures.fam_trajectory(coords, max_points=200)
    path = fig.data[0]
    assert len(path.x) <= 200 and path.customdata[-1] == 4999 and path.customdata[0] == 0


# -- inspector: trajectories, document shading, runs --------------------------------------------------------
def test_pca_2d_finds_the_main_direction_deterministically():
    t = np.linspace(-1, 1, 50)
    features = np.stack([10 * t, 0.1 * np.cos(3 * t), np.zeros_like(t)], axis=1)
    coords = inspector.pca_2d(features)
    assert coords.shape == (50, 2)
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.abs(features[:, 0] - features[:, 0].mean()), atol=1e-4)
    np.testing.assert_allclose(coords, inspector.pca_2d(features))
    assert inspector.pca_2d(features[:1]).shape == (1, 2)


def test_state_features_are_compact_and_keep_distances():
    rng = np.random.default_rng(0)
    features = inspector.StateFeatures([3])
    states = rng.standard_normal((2, 8, 256)).astype(np.float32)
    for state in states:
        features.add(3, state)
    projected = features.array(3)
    assert projected.shape == (2, 8 * inspector.TRAJECTORY_DIMS)
    ratio = np.linalg.norm(projected[0] - projected[1]) / np.linalg.norm(states[0] - states[1])
    assert 0.7 < ratio < 1.3  # a random projection keeps distances roughly


def test_parse_layers():
    assert inspector.parse_layers("", 30) == [0, 15, 29]
    assert inspector.parse_layers("3, 1; -1", 30) == [1, 3, 29]
    for bad, words in [("x", "whole numbers"), ("30", "layers 0 to 29"), ("0,1,2,3,4,5,6", "at most")]:
        with pytest.raises(ValueError, match=words):
            inspector.parse_layers(bad, 30)


def _fam_trace(blocks=4, block=5, layers=2, heads=2, fam_len=3, hidden=8) -> Trace:
    kinds = {
        "tokens.nll": [],
        "block.share": list(range(layers)),
        "fam.share": list(range(layers)),
        "fam.read": list(range(layers)),
        "fam.norm": list(range(layers)),
        "fam.update": list(range(layers)),
        "fam.state": [1],
        "fam.lens": [layers - 1],
        "fam.lens_p": [layers - 1],
        **{key: [layers - 1] for key in ("fam.slot_norm", "fam.slot_update", "fam.slot_received", "fam.slot_read")},
    }
    config = FamConfig(mode="fam", block_size=block, fam_len=fam_len, mem_blocks=1)
    meta = {"model": "tiny", "config": config.to_dict(), "n_layers": layers, "dtype": "float32", "lens_top_k": 2}
    meta["lens_vocab"] = {str(i): f" tok{i}" for i in range(10)}
    trace = Trace(meta, kinds)
    rng = np.random.default_rng(3)
    words = [f"w{i} " for i in range(blocks * block)]
    trace.text = "".join(words)
    at = 0
    for w in words:
        trace.offsets.append((at, at + len(w) - 1))
        at += len(w)
    for b in range(blocks):
        read = rng.random((layers, block)).astype(np.float16)
        read[0, 2] = 5.0  # one token of each block read far more by layer 0
        trace.append_block(
            b * block,
            list(range(block)),
            {
                "tokens.nll": rng.random(block).astype(np.float32),
                "block.share": _share(1, layers, heads, 4, seed=b)[0],
                "fam.share": _share(1, layers, heads, 2, seed=b)[0],
                "fam.read": read,
                "fam.norm": rng.random(layers).astype(np.float32),
                "fam.update": rng.random(layers).astype(np.float32),
                "fam.state": rng.standard_normal((1, fam_len, hidden)).astype(np.float16),
                "fam.lens": rng.integers(0, 10, (1, fam_len, 2)).astype(np.int32),
                "fam.lens_p": np.sort(rng.random((1, fam_len, 2)), axis=-1)[..., ::-1].astype(np.float16) / 2,
                "fam.slot_norm": rng.random((1, fam_len)).astype(np.float32) + 1,
                "fam.slot_update": rng.random((1, fam_len)).astype(np.float32) / 10,
                "fam.slot_received": rng.random((1, fam_len)).astype(np.float32) / fam_len,
                "fam.slot_read": rng.random((1, fam_len, block)).astype(np.float16) / block,
            },
        )
    return trace


def test_document_html_shades_reads_and_frames_the_block():
    trace = _fam_trace()
    page = inspector.document_html(trace, block=2, layer=0)
    assert 'class="cur"' in page and "block 2" in page
    assert ">w10<" in page and ">w14<" in page and ">w5<" in page  # blocks 1 and 2 are shown...
    assert ">w4" not in page  # ...block 0 only in the history list
    assert 'class="tok s10" title="token 12 · block 2 · read 5' in page  # the most-read token, darkest
    assert "Most-read tokens" in page and "block 0: w2" in page
    assert "layer 0" in page
    mean = inspector.document_html(trace, block=None, layer=None)
    assert "mean over layers" in mean and "block 3" in mean


def test_document_html_is_bounded_for_long_documents(monkeypatch):
    monkeypatch.setattr(inspector, "MAX_WINDOW_TOKENS", 6)
    monkeypatch.setattr(inspector, "MAX_HISTORY_ROWS", 2)
    page = inspector.document_html(_fam_trace(blocks=20), layer=1)
    assert page.count('title="token ') == 6
    assert page.count("<li>") == 2 and "2 of 18 earlier blocks" in page


def test_document_html_without_fam_reads_is_unshaded():
    trace = _trace(fam=False)
    trace.text = "abcdefghijkl"
    trace.offsets = [(i, i + 1) for i in range(12)]
    page = inspector.document_html(trace)
    assert "only in fam mode" in page and " s1" not in page


def test_run_views_from_a_trace():
    trace = _fam_trace()
    trace.meta["compare"] = {"mode": "bswa", "block_nll": [1.0, 2.0, None, 3.0]}
    run = inspector.Run.from_trace(trace, name="t.npz")
    assert run.state == "replayed" and run.blocks_done == 4 and run.compare_mode == "bswa"
    assert run.features.layers == [1] and run.features.n_blocks == 4
    assert np.asarray(run.heatmap().data[0].z).shape == (2, 4)
    assert "Block 3" in run.heads().layout.title.text
    run.block = 1
    assert "Block 1" in run.heads().layout.title.text and run.heatmap().layout.shapes[0].x0 == 0.5
    assert [t.name for t in run.loss().data][:2] == ["fam", "bswa"]
    assert len(run.dynamics().data) == 2
    path = run.trajectory().data[0]
    assert path.name == "layer 1" and len(path.x) == 4 and np.abs(np.asarray(path.x)).max() == pytest.approx(1.0)
    assert "Replayed" in run.status() and "fam vs bswa" in run.status()
    assert "tiny" in run.caption() and "FAM 3" in run.caption()


def test_layer_axes_label_whole_layers_only():
    """A 4-layer model once read "0 0.5 1 1.5..." on its layer axes; recorded layers may also skip some."""
    rng = np.random.default_rng(0)
    fig = figures.share_heatmap(rng.random((3, 4, 2, 4)), "fam")
    assert list(fig.layout.yaxis.tickvals) == [0, 1, 2, 3]
    dynamics = figures.fam_dynamics(rng.random((5, 3)), rng.random((5, 3)), layers=[0, 10, 29])
    assert list(dynamics.layout.yaxis.tickvals) == list(dynamics.layout.yaxis2.tickvals) == [0, 10, 29]
    many = figures.share_heatmap(rng.random((3, 30, 2, 4)), "fam")
    assert many.layout.yaxis.tickformat == "d"


def test_loss_curve_draws_split_probes_apart_and_no_empty_panel(tmp_path):
    from famviz.viz.training_figures import loss_curve_figure, write_loss_curve

    def step(n, kind, split=0, probe=None):
        return {
            "step": n,
            "loss": 1.0 / n,
            "kind": kind,
            "loss_main": 0.5,
            "loss_readout": probe,
            "readout_split": split,
        }

    history = [step(1, "copy"), step(2, "passkey", 0, 2.0), step(3, "passkey", 40, 3.0), step(4, "passkey", 0, 1.5)]
    figure = loss_curve_figure(history)
    names = [trace.name for trace in figure.data]
    assert "passkey: read-out probes in their block (mean of last 25)" in names
    split = next(t for t in figure.data if t.name.startswith("passkey: read-out probes across a block boundary"))
    assert list(split.x) == [3] and list(split.y) == [3.0]
    assert len(figure.layout.annotations) == 0 and "yaxis2" not in figure.layout.to_plotly_json()  # no evaluations
    evaluated = loss_curve_figure(
        [*history, {"step": 4, "eval": {"length": 512, "accuracy": 0.5, "trials": 2, "key_logprob": -1.0}}]
    )
    assert evaluated.data[-1].name.startswith("key log-prob") and "yaxis2" in evaluated.layout.to_plotly_json()
    assert "depth 0," in evaluated.layout.yaxis2.title.text  # logs before the depth was recorded: depth 0
    deep = {"step": 4, "eval": {"length": 8192, "depth": 0.5, "accuracy": 0.0, "trials": 2, "key_logprob": -4.0}}
    assert "depth 0.5," in loss_curve_figure([*history, deep]).layout.yaxis2.title.text  # the run's own depth
    assert loss_curve_figure([{"stage": "start"}]) is None
    old = [{k: v for k, v in r.items() if k != "readout_split"} for r in history]  # logs before the field existed
    assert "passkey: read-out probes (mean of last 25)" in [t.name for t in loss_curve_figure(old).data]
    assert write_loss_curve(history, tmp_path).name == "loss_curve.html"


def test_the_memory_lens_heatmap_is_slot_by_block_with_the_top_tokens_on_hover():
    trace = _fam_trace(blocks=6)
    fig = figures.lens_figure(trace)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 6)  # fam_len slots × blocks
    np.testing.assert_allclose(z[:, 4], trace["fam.1.lens_p"][4, :, 0].astype(np.float32))
    first, second = trace["fam.1.lens"][4, 0]
    assert fig.data[0].text[0][4].startswith(f"␣tok{first} ") and f"␣tok{second}" in fig.data[0].text[0][4]
    assert "layer 1" in fig.layout.title.text and "after block 5" in fig.layout.title.text
    assert "layer 0 was not recorded" in figures.lens_figure(trace, layer=0).layout.title.text
    assert list(figures.lens_figure(trace, selected_block=2).data[0].x) == [0, 1, 2]
    long = figures.memory_lens_heatmap(
        np.zeros((100, 3, 2), np.int32), np.full((100, 3, 2), 0.5, np.float16), str, layer=1
    )
    assert list(long.data[0].x) == list(range(100 - figures.MAX_LENS_BLOCKS, 100))  # the latest blocks only
    held = figures.held_tokens(np.array([[4, 1], [4, 2], [7, 1]]), np.array([[0.5, 0.1], [0.9, 0.05], [0.3, 0.2]]), str)
    assert held == [("4", 2, pytest.approx(0.9)), ("7", 1, pytest.approx(0.3))]


def test_a_trace_without_the_lens_says_how_to_record_it():
    trace = _fam_trace()
    del trace._chunks["fam.lens"], trace._chunks["fam.lens_p"], trace._layers["fam.lens"], trace._layers["fam.lens_p"]
    fig = figures.lens_figure(trace)
    assert not fig.data and "--lens" in fig.layout.annotations[0].text


def test_the_per_slot_view_stacks_norm_update_and_received_attention_slot_by_block():
    trace = _fam_trace(blocks=6)
    fig = figures.slot_figure(trace)
    assert len(fig.data) == 3 and "layer 1" in fig.layout.title.text
    for heatmap, (key, *_) in zip(fig.data, figures.SLOT_ROWS, strict=True):
        np.testing.assert_allclose(np.asarray(heatmap.z), trace[key.replace("fam.", "fam.1.")].T, rtol=1e-6)
    assert "layer 0 was not recorded" in figures.slot_figure(trace, layer=0).layout.title.text
    page = inspector.document_html(trace, block=3, layer=None, slot=2)
    assert "slot 2 of layer 1" in page  # the shading says whose reads it shows
    reads = inspector.token_reads(trace, None, slot=2)
    np.testing.assert_allclose(reads, trace["fam.1.slot_read"][2].astype(np.float32))
    assert inspector.token_reads(trace, None, slot=99) is None


def test_content_only_shading_leaves_sink_like_tokens_out_of_the_scale_and_the_lists():
    trace = _fam_trace(blocks=4)  # 4 blocks of 5 tokens
    words = ["the", ",", "memory", " ", "key"] * 4
    trace.text = "".join(words)
    at, trace.offsets = 0, []
    for word in words:
        trace.offsets.append((at, at + len(word)))
        at += len(word)
    page = inspector.document_html(trace, block=3, content=True)
    assert "content tokens only" in page
    spans = re.findall(r'<span class="(tok[^"]*)" title="token (\d+)[^"]*">([^<]*)</span>', page)
    content_classes = []
    for klass, position, text in spans:
        if text in ("the", ",", " ") or int(position) % 5 == 0:  # common word, punctuation, space, block start
            assert klass == "tok", (position, text)
        else:
            content_classes.append(klass)
    assert content_classes and all(k.startswith("tok s") for k in content_classes)  # random reads are all > 0
    assert "sink-like: not shaded" in page
    history = page.split("Most-read tokens")[1]
    assert "the (" not in history and "memory (" in history
    assert "sink-like" not in inspector.document_html(trace, block=3)  # off by default
    assert inspector.sink_like("The", 7, set()) and not inspector.sink_like("memory", 7, set())
    assert inspector.sink_like("memory", 5, {5}) and inspector.sink_like("\n", 3, set())

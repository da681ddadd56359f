"""The trace: channels, exact shares, save/load without the model."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import random_ids

from famviz import FamConfig, Stream, Trace
from famviz.core.trace import CHANNEL_KINDS, KINDS_BY_KEY, ChannelSelection, channel_names
from famviz.errors import FamvizError


@pytest.fixture(scope="module")
def fam_trace(tiny_llama):
    return Stream(tiny_llama, FamConfig("fam", 8, 4, 1)).run(random_ids(45)).trace


def test_shares_sum_to_one(fam_trace):
    block_share, fam_share = fam_trace.array("block.share"), fam_trace.array("fam.share")
    n_layers, n_heads = 3, 4
    assert block_share.shape == (6, n_layers, n_heads, 4) and fam_share.shape == (6, n_layers, n_heads, 2)
    np.testing.assert_allclose(block_share.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(fam_share.sum(-1), 1, atol=1e-5)
    assert (block_share[0, :, :, 1] == 0).all()  # block 0 has no memory yet


def test_fam_read_is_consistent_with_fam_share(fam_trace):
    read = fam_trace.array("fam.read").astype(np.float64)  # (layers, tokens)
    assert read.shape == (3, 45)
    starts = fam_trace.block_starts + [45]
    for b in range(6):
        per_block = read[:, starts[b] : starts[b + 1]].sum(-1)
        np.testing.assert_allclose(per_block, fam_trace.array("fam.share")[b, :, :, 1].mean(-1), atol=2e-3)


def test_fam_state_channels(fam_trace):
    state = fam_trace["fam.2.state"]
    assert state.shape == (6, 4, 64) and state.dtype == np.float16
    norm = fam_trace["fam.2.norm"]
    np.testing.assert_allclose(norm, np.linalg.norm(state.astype(np.float32), axis=-1).mean(-1), rtol=2e-3)
    update = fam_trace["fam.2.update"]
    a, b = state[2].astype(np.float32).ravel(), state[1].astype(np.float32).ravel()
    np.testing.assert_allclose(update[2], 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b), atol=2e-3)
    assert fam_trace["tokens.nll"].shape == (45,)


def test_save_and_reload_without_model(fam_trace, tmp_path):
    fam_trace.text = "some text"
    fam_trace.offsets = [(i, i + 1) for i in range(45)]
    path = fam_trace.save(tmp_path / "run.npz")
    loaded = Trace.load(path)
    assert loaded.meta == fam_trace.meta
    assert loaded.channels == fam_trace.channels
    assert loaded.token_ids == fam_trace.token_ids and loaded.block_starts == fam_trace.block_starts
    assert loaded.text == "some text" and loaded.offsets == fam_trace.offsets
    for key in fam_trace.keys:
        np.testing.assert_array_equal(loaded.array(key), fam_trace.array(key))


def test_traces_from_before_sink_mode_load_with_an_empty_sink_group(fam_trace, tmp_path):
    from famviz.core.modes import BLOCK_GROUPS

    old = Trace(dict(fam_trace.meta, block_share_groups=["fam", "memory", "block"]), fam_trace._layers)
    for b, start in enumerate(fam_trace.block_starts):
        values = {key: fam_trace.array(key)[b] for key in fam_trace.keys if not KINDS_BY_KEY[key].per_token}
        values["block.share"] = values["block.share"][..., :3]
        old.append_block(start, fam_trace.token_ids[start : start + 8], values)
    loaded = Trace.load(old.save(tmp_path / "old.npz"))
    share = loaded.array("block.share")
    assert share.shape[-1] == len(BLOCK_GROUPS) and loaded.meta["block_share_groups"] == list(BLOCK_GROUPS)
    np.testing.assert_array_equal(share[..., :3], fam_trace.array("block.share")[..., :3])
    assert (share[..., BLOCK_GROUPS.index("sink")] == 0).all()


def test_channel_selection(tiny_llama):
    trace = Stream(tiny_llama, FamConfig("fam", 8, 4, 1), channels=["fam.1.*", "tokens.nll"]).run(random_ids(20)).trace
    assert set(trace.keys) == {"fam.share", "fam.read", "fam.state", "fam.norm", "fam.update", "tokens.nll"}
    assert trace.layers_of("fam.state") == [1]
    assert trace["fam.1.state"].shape == (3, 4, 64)
    with pytest.raises(KeyError):
        trace["fam.0.state"]
    with pytest.raises(KeyError):
        trace["block.1.share"]


def test_unknown_channel_is_refused():
    with pytest.raises(FamvizError, match="unknown trace channel"):
        ChannelSelection(["fam.*.sate"], n_layers=2, fam=True)


def test_modes_without_fam_have_no_fam_channels(tiny_llama):
    trace = Stream(tiny_llama, FamConfig("bswa", 8, 4, 1)).run(random_ids(20)).trace
    assert not any(key.startswith("fam.") for key in trace.keys)
    assert "block.0.share" in trace


def test_every_channel_kind_is_documented():
    import famviz.core.trace as module

    for kind in CHANNEL_KINDS:
        assert f"``{kind.pattern}``" in module.__doc__
    assert "fam.0.state" in channel_names(2) and "fam.0.state" not in channel_names(2, fam=False)


def test_not_a_trace_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FamvizError, match="bad.npz is not a famviz trace file"):
        Trace.load(bad)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda raw: raw[: len(raw) // 2], "the archive is damaged or cut short"),  # a download cut short
        (lambda raw: bytes(range(256)) * 40, "not a NumPy .npz archive"),  # random bytes
        (lambda raw: b"PK\x03\x04" + bytes(500), "the archive is damaged or cut short"),
        (lambda raw: b"", "the file is empty"),
    ],
)
def test_damaged_trace_files_get_one_true_line(fam_trace, tmp_path, damage, reason):
    """Never numpy's advice to allow pickle, never the file's directory (a server path in the app)."""
    good = fam_trace.save(tmp_path / "good.npz")
    bad = tmp_path / "sub" / "bad.npz"
    bad.parent.mkdir()
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(FamvizError) as info:
        Trace.load(bad)
    message = str(info.value)
    assert message == f"bad.npz is not a famviz trace file ({reason})"
    assert "pickle" not in message and str(tmp_path) not in message
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(FamvizError, match="other.npz is not a famviz trace file"):
        Trace.load(other)


def test_cli_export_of_a_truncated_trace_is_one_line(fam_trace, tmp_path, capfd):
    from helpers import assert_one_line_error, run_cli_in_process

    good = fam_trace.save(tmp_path / "good.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:1000])
    status, out, err = run_cli_in_process(
        ["export", str(cut), "--figure", "heatmap", "--format", "html", "--out", str(tmp_path / "x.html")], capfd
    )
    assert status == 2
    assert_one_line_error(status, out, err, contains=("cut.npz is not a famviz trace file", "cut short"))


def test_compact_trace_keeps_the_slot_mean(tiny_llama, fam_trace):
    """The compact form stores each state as its slots' mean; the other channels are unchanged."""
    compact = Stream(tiny_llama, FamConfig("fam", 8, 4, 1), compact_trace=True).run(random_ids(45)).trace
    assert compact.meta["fam_state_form"] == "slot-mean" and fam_trace.meta["fam_state_form"] == "slots"
    state = compact["fam.2.state"]
    assert state.shape == (6, 1, 64) and state.dtype == np.float16
    full = fam_trace["fam.2.state"].astype(np.float32)
    np.testing.assert_allclose(state[:, 0].astype(np.float32), full.mean(axis=1), atol=2e-2, rtol=2e-3)
    for key in ("fam.norm", "fam.update", "block.share", "fam.read", "tokens.nll"):
        np.testing.assert_array_equal(compact.array(key), fam_trace.array(key))
    assert compact.nbytes() < fam_trace.nbytes()


# -- the memory lens (opt-in) ----------------------------------------------------------------------------
def test_the_memory_lens_is_opt_in_and_recorded_with_its_probabilities():
    everything = ChannelSelection(None, n_layers=3, fam=True)
    assert "fam.lens" not in everything and "fam.lens_p" not in everything
    assert "fam.lens" not in ChannelSelection(["*", "fam.*.*"], n_layers=3, fam=True)
    named = ChannelSelection(["fam.*.lens"], n_layers=3, fam=True)
    assert named.layers == {"fam.lens": [0, 1, 2], "fam.lens_p": [0, 1, 2]}
    one = ChannelSelection(["tokens.nll", "fam.2.lens_p"], n_layers=3, fam=True)
    assert one.layers["fam.lens"] == one.layers["fam.lens_p"] == [2]
    assert "fam.lens" not in ChannelSelection(["fam.*.lens"], n_layers=3, fam=False)  # no FAM, no lens


def test_the_memory_lens_decodes_each_slot_through_the_final_norm_and_unembedding(tiny_llama, tmp_path):
    import torch

    config = FamConfig("fam", 8, 4, 1)
    ids = random_ids(20)
    stream = Stream(tiny_llama, config, channels=["tokens.nll", "fam.1.lens", "fam.1.state"], lens_top_k=3)
    trace = stream.run(ids).trace
    lens, probs = trace["fam.1.lens"], trace["fam.1.lens_p"]
    assert lens.shape == probs.shape == (3, 4, 3) and lens.dtype == np.int32 and probs.dtype == np.float16
    assert trace.meta["lens_top_k"] == 3
    fam_model = stream.fam_model
    state = fam_model.initial_state()
    with torch.inference_mode():
        for block, start in enumerate(range(0, 20, 8)):
            state = fam_model.forward_block(torch.tensor([ids[start : start + 8]]), state).state
            logits = tiny_llama.model.lm_head(tiny_llama.model.model.norm(state.fam[1][0]))
            top = torch.softmax(logits.float(), dim=-1).topk(3, dim=-1)
            np.testing.assert_array_equal(lens[block], top.indices.numpy())
            np.testing.assert_allclose(probs[block].astype(np.float32), top.values.numpy(), rtol=2e-3, atol=1e-4)
    assert (np.diff(probs.astype(np.float32), axis=-1) <= 0).all()  # most probable first
    assert {int(i) for i in np.unique(lens)} == {int(k) for k in trace.meta["lens_vocab"]}
    loaded = Trace.load(trace.save(tmp_path / "lens.npz"))
    np.testing.assert_array_equal(loaded["fam.1.lens"], lens)
    assert loaded.token_text(int(lens[0, 0, 0])) == trace.token_text(int(lens[0, 0, 0]))
    assert loaded.token_text(10**6) == "#1000000"  # an id the lens never showed


def test_a_version_1_trace_loads_as_one_without_the_lens(fam_trace, tmp_path):
    import io
    import json
    import zipfile

    path = fam_trace.save(tmp_path / "v2.npz")
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(bytes(arrays["meta_json"]).decode())
    meta["version"] = 1
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (tmp_path / "v1.npz").write_bytes(buffer.getvalue())
    assert zipfile.is_zipfile(tmp_path / "v1.npz")
    old = Trace.load(tmp_path / "v1.npz")
    assert "fam.lens" not in old.keys and old.channels == fam_trace.channels


# -- per-slot views (opt-in) ---------------------------------------------------------------------------------
def test_per_slot_channels_add_up_to_the_slot_averaged_ones(tiny_llama, tmp_path):
    patterns = ["*", "fam.1.slot_norm", "fam.1.slot_update", "fam.1.slot_received", "fam.1.slot_read"]
    assert not {"fam.slot_norm", "fam.slot_read"} & set(ChannelSelection(None, 3, fam=True).layers)  # opt-in
    trace = Stream(tiny_llama, FamConfig("fam", 8, 4, 1), channels=patterns).run(random_ids(45)).trace
    norm, update = trace["fam.1.slot_norm"], trace["fam.1.slot_update"]
    assert norm.shape == update.shape == (6, 4)  # blocks × slots
    np.testing.assert_allclose(norm.mean(-1), trace["fam.1.norm"], rtol=1e-5)
    assert ((update >= 0) & (update <= 2)).all() and (update > 0).any()
    received = trace["fam.1.slot_received"]  # each slot's share of the block queries' attention
    fam_share = trace["block.1.share"][..., 0].mean(-1)  # the FAM group's share, mean over heads
    np.testing.assert_allclose(received.sum(-1), fam_share, rtol=1e-4, atol=1e-6)
    read = trace["fam.1.slot_read"].astype(np.float32)  # (slots, tokens)
    assert read.shape == (4, 45)
    np.testing.assert_allclose(read.mean(0), trace["fam.1.read"].astype(np.float32), atol=2e-3)
    loaded = Trace.load(trace.save(tmp_path / "slots.npz"))
    np.testing.assert_array_equal(loaded["fam.1.slot_read"], trace["fam.1.slot_read"])


def test_each_tokens_own_shares_average_to_the_blocks(tiny_llama):
    trace = Stream(tiny_llama, FamConfig("fam", 8, 4, 1), channels=["*", "block.*.token_share"]).run(random_ids(45))
    trace = trace.trace
    assert "block.token_share" not in ChannelSelection(None, 3, fam=True)  # opt-in
    own = trace["block.2.token_share"].astype(np.float32)  # (heads, groups, tokens)
    assert own.shape == (4, 4, 45)
    np.testing.assert_allclose(own.sum(1), 1, atol=2e-3)  # every token's shares add up to 1 per head
    starts = trace.block_starts + [45]
    for b in range(6):
        mean = own[..., starts[b] : starts[b + 1]].mean(-1)
        np.testing.assert_allclose(mean, trace["block.2.share"][b], atol=2e-3)

"""Integration tests on the real bundled SmolLM2-135M (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from famviz import FamConfig, FamModel, IncrementalTokenizer, Stream, tokenize_document

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def streamed_logits(loaded, config, ids):
    fam = FamModel(loaded, config)
    state, outputs = fam.initial_state(), []
    with torch.no_grad():
        for s in range(0, len(ids), config.block_size):
            out = fam.forward_block(torch.tensor([ids[s : s + config.block_size]]), state)
            outputs.append(fam.logits(out.hidden)[0].float())
            state = out.state
    return torch.cat(outputs)


@pytest.fixture(scope="module")
def gpl_ids(bundled_fp32, gpl_text):
    return tokenize_document(bundled_fp32.tokenizer, gpl_text)[0]


def test_full_reproduces_the_model_fp32(bundled_fp32, gpl_ids):
    ids = gpl_ids[:600]
    with torch.no_grad():
        reference = bundled_fp32.model(torch.tensor([ids])).logits[0]
    ours = streamed_logits(bundled_fp32, FamConfig("full", 256, 0, 0), ids)
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-4)
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() > 0.999


def test_full_reproduces_the_model_in_the_auto_dtype(bundled_fast, gpl_ids):
    ids = gpl_ids[:512]
    with torch.no_grad():
        reference = bundled_fast.model(torch.tensor([ids])).logits[0].float()
    ours = streamed_logits(bundled_fast, FamConfig("full", 256, 0, 0), ids)
    # bf16 (where auto picks it) rounds differently in one call and in two blocks; predictions and log-probs agree
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() > 0.97
    lp_ours, lp_ref = torch.log_softmax(ours, -1), torch.log_softmax(reference, -1)
    targets = torch.tensor(ids[1:])[:, None]
    nll_ours, nll_ref = -lp_ours[:-1].gather(1, targets), -lp_ref[:-1].gather(1, targets)
    assert abs(nll_ours.mean() - nll_ref.mean()) < 0.02


def test_bswa_with_full_memory_is_full_on_real_text(bundled_fp32, gpl_ids):
    ids = gpl_ids[:700]  # 3 blocks, the last partial
    full = Stream(bundled_fp32, FamConfig("full", 256, 0, 0), record=False).run(ids)
    bswa = Stream(bundled_fp32, FamConfig("bswa", 256, 0, 3), record=False).run(ids)
    np.testing.assert_allclose(bswa.nll, full.nll, atol=1e-3)
    assert 2.0 < full.nll_mean < 4.0  # plain English licence text


def test_text_in_pieces_tokenizes_like_the_whole(bundled_fp32, gpl_text):
    whole, whole_offsets = tokenize_document(bundled_fp32.tokenizer, gpl_text)
    rng = np.random.default_rng(0)
    for max_piece in (7, 300, 5000):
        incremental = IncrementalTokenizer(bundled_fp32.tokenizer)
        ids, offsets, position = [], [], 0
        while position < len(gpl_text):
            size = int(rng.integers(1, max_piece))
            got = incremental.push(gpl_text[position : position + size])
            ids += got[0]
            offsets += got[1]
            position += size
        got = incremental.flush()
        ids, offsets = ids + got[0], offsets + got[1]
        assert ids == whole
        assert offsets == whole_offsets


def test_feed_text_in_pieces_equals_whole_stream(bundled_fast, gpl_text):
    text = gpl_text[:3000]
    config = FamConfig("fam", 128, 16, 1)
    whole = Stream(bundled_fast, config).run_text(text)
    stream = Stream(bundled_fast, config)
    for s in range(0, len(text), 123):
        stream.feed_text(text[s : s + 123])
    pieces = stream.finish()
    np.testing.assert_array_equal(pieces.nll, whole.nll)
    assert pieces.trace.offsets == whole.trace.offsets and pieces.trace.text == text

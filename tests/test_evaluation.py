"""Long-document evaluation (NLL per quarter, FAM norm over blocks) on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from famviz import FamConfig, prepare_model
from famviz.engine import Stream
from famviz.errors import ConfigError
from famviz.evaluation import fam_norm, held_out_documents, long_document_eval, pydoc_text
from famviz.fam_model import FamModel
from helpers import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny():
    return prepare_model(tiny_causal_lm("llama", vocab_size=128, seed=0), tokenizer=None, name="tiny")


def test_quarters_split_the_streamed_loss(tiny):
    model = FamModel(tiny, FamConfig("fam", 8, 4, 0))
    ids = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    summary = long_document_eval(model, ids, quarters=4, norm_after=(2, 5))
    nll = Stream(model, record=False).run(ids).nll
    assert summary["nll"] == pytest.approx(float(np.nanmean(nll)), rel=1e-6)
    assert summary["nll_quarters"][1] == pytest.approx(float(nll[20:40].mean()), rel=1e-6)
    assert summary["nll_quarters"][0] == pytest.approx(float(np.nanmean(nll[:20])), rel=1e-6)  # first token: NaN
    assert set(summary["fam_norm_after_blocks"]) == {"0", "2", "5"}


def test_fam_norm_after_blocks_follows_the_stream_even_past_the_document(tiny):
    model = FamModel(tiny, FamConfig("fam", 8, 4, 0))
    ids = list(range(1, 25))  # 3 blocks; 5 blocks are asked for: the document is repeated
    summary = long_document_eval(model, ids, norm_after=(5,))
    state = model.initial_state(1)
    for index in range(5):
        chunk = (ids * 2)[index * 8 : (index + 1) * 8]
        state = model.forward_block(torch.tensor([chunk]), state).state
    assert summary["fam_norm_after_blocks"]["5"] == pytest.approx(fam_norm(state.fam), rel=1e-6)
    no_fam = long_document_eval(FamModel(tiny, FamConfig("bswa", 8, 0, 0)), ids)
    assert no_fam["fam_norm_after_blocks"] == {}


def test_held_out_documents_default_and_given(tmp_path):
    from helpers import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    documents = held_out_documents(tokenizer, 2000)
    assert [d.name for d in documents] == ["GPL-3", "pydoc"] and all(len(d.ids) == 2000 for d in documents)
    assert [len(d.ids) for d in held_out_documents(tokenizer, 8192)] == [7658, 8192]  # GPL-3 is used whole
    assert "argparse" in pydoc_text(("argparse",))
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(ConfigError, match="fewer than"):
        held_out_documents(tokenizer, 2000, [str(short)])

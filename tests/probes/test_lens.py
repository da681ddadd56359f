"""The memory lens as a probe (famviz.probes.lens): a key's digits in the FAM's lens, against a control."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_with_bundled_tokenizer

from famviz import FamConfig, FamModel
from famviz.probes import lens
from famviz.probes.passkey import advance, make_passkey_document


@pytest.fixture(scope="module")
def tiny_with_tokenizer():
    return tiny_llama_with_bundled_tokenizer(n_layers=2)


def test_the_key_digits_are_the_digit_tokens_of_the_key_sentence(tiny_with_tokenizer):
    tokenizer = tiny_with_tokenizer.tokenizer
    document = make_passkey_document(tokenizer, 300, 0.0, key=40917)
    digits = lens.key_digit_ids(tokenizer, document)
    assert {tokenizer.decode([t]).strip() for t in digits} <= set("0123456789") | {"40917"}
    assert (
        "".join(tokenizer.decode([t]) for t in tokenizer.encode("40917", add_special_tokens=False)).strip() == "40917"
    )
    assert digits and all(t in document.token_ids[slice(*document.key_span)] for t in digits)


def test_key_in_lens_counts_the_slots_that_show_a_digit_with_and_without_the_key(tiny_with_tokenizer):
    tokenizer = tiny_with_tokenizer.tokenizer
    fam_model = FamModel(tiny_with_tokenizer, FamConfig("fam", 32, 8, 0))
    document = make_passkey_document(tokenizer, 200, 0.0, seed=5)
    wide = len(tokenizer)  # every token is in the top "k": every slot shows every digit
    finding = lens.key_in_lens(fam_model, tokenizer, document, layers=[0, 1], k=wide, blocks_after=1)
    assert (
        finding.slots_with_key == finding.slots_without_key == 2 * 8 and finding.with_key and finding.blocks_after == 1
    )
    # k = 1: exactly the slots whose top token is a key digit, after the key's block and one more
    stop = (document.key_span[1] // 32 + 2) * 32
    state = advance(fam_model, fam_model.initial_state(), document.haystack_ids[:stop])
    with torch.inference_mode():
        top = torch.stack([fam_model.lens(state.fam[layer][0], 1)[0][:, 0] for layer in (0, 1)])
    digits = torch.tensor(sorted(lens.key_digit_ids(tokenizer, document)))
    expected = int(torch.isin(top, digits).sum())
    assert lens.key_in_lens(fam_model, tokenizer, document, [0, 1], k=1, blocks_after=1).slots_with_key == expected
    with pytest.raises(ValueError, match="fewer than"):
        lens.key_in_lens(fam_model, tokenizer, document, [0], blocks_after=50)
    with pytest.raises(ValueError, match="FAM slots"):
        lens.key_in_lens(FamModel(tiny_with_tokenizer, FamConfig("bswa", 32, 0, 0)), tokenizer, document, [0])

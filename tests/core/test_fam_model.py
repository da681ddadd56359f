"""FamModel's passes beside the stream's block, on tiny random models: the next-token NLL whose gradient is
formed in forward, and a side read of a block (``read_block``) against the block itself."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_loaded

from famviz import FamConfig
from famviz.core.fam_model import FamModel

VOCAB = 128


# -- the next-token NLL with its gradient formed in forward -------------------------------------------
@pytest.mark.parametrize("rows", [1, 31, 32, 70])  # fewer, as many and more than one softmax chunk holds
def test_linear_nll_equals_cross_entropy_in_value_and_gradient(rows):
    from famviz.core.linear_nll import linear_nll

    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    hidden = torch.randn(rows, 16, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 300, (rows,), generator=gen)
    upstream = torch.rand(rows, generator=gen, dtype=torch.float64)
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(a @ weight.t(), targets, reduction="none")
    (expected * upstream).sum().backward()
    got = linear_nll(b, weight, targets)
    (got * upstream.float()).sum().backward()
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected.detach(), atol=1e-5)
    assert torch.allclose(b.grad, a.grad, atol=1e-6)


def test_linear_nll_in_bfloat16_is_as_close_to_float32_as_the_plain_form():
    from famviz.core.linear_nll import linear_nll

    gen = torch.Generator().manual_seed(0)
    weight, hidden = torch.randn(2000, 64, generator=gen) * 0.2, torch.randn(40, 64, generator=gen)
    targets = torch.randint(0, 2000, (40,), generator=gen)

    def value_and_gradient(dtype, fused):
        h = hidden.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype)
        if fused:
            nll = linear_nll(h, w, targets)
        else:
            nll = torch.nn.functional.cross_entropy((h @ w.t()).float(), targets, reduction="none")
        nll.sum().backward()
        return nll.detach(), h.grad.float()

    exact_nll, exact_grad = value_and_gradient(torch.float32, fused=False)
    for fused in (False, True):
        nll, grad = value_and_gradient(torch.bfloat16, fused)
        assert (nll - exact_nll).abs().max() < 0.1
        assert (grad - exact_grad).norm() / exact_grad.norm() < 0.01


def test_linear_nll_without_gradient_keeps_nothing_and_refuses_a_trainable_weight():
    from famviz.core.linear_nll import linear_nll

    weight, hidden = torch.randn(50, 8), torch.randn(5, 8)
    targets = torch.arange(5)
    with torch.no_grad():
        nll = linear_nll(hidden, weight, targets)
    assert nll.grad_fn is None
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    assert torch.allclose(nll, expected, atol=1e-5)
    with pytest.raises(ValueError, match="frozen"):
        linear_nll(hidden, weight.clone().requires_grad_(), targets)


@pytest.mark.parametrize("trainable_head", [False, True])
def test_target_nll_is_the_cross_entropy_of_the_models_logits(trainable_head):
    """``FamModel.target_nll``: the fused form for a frozen head, the plain one when the head trains."""
    loaded = tiny_loaded()
    model = FamModel(loaded, FamConfig("fam", 8, 4, 0))
    model.model.lm_head.weight.requires_grad_(trainable_head)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, model.model.lm_head.in_features, generator=gen)
    targets = torch.randint(0, VOCAB, (9,), generator=gen)
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(model.logits(a).float(), targets, reduction="none")
    expected.sum().backward()
    got = model.target_nll(b, targets)
    got.sum().backward()
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(b.grad, a.grad, atol=1e-6)


# -- side reads (read-out probes) -----------------------------------------------------------------------
@pytest.mark.parametrize("mode,mem_blocks", [("fam", 0), ("fam", 2), ("bswa", 1), ("full", 0)])
def test_read_block_equals_the_block_rows_of_a_forward_block(mode, mem_blocks):
    model = FamModel(tiny_loaded(), FamConfig(mode, 8, 4 if mode == "fam" else 0, mem_blocks))
    gen = torch.Generator().manual_seed(1)
    state = model.initial_state(2)
    with torch.no_grad():
        for _ in range(3):
            state = model.forward_block(torch.randint(0, VOCAB, (2, 8), generator=gen), state).state
        probe = torch.randint(0, VOCAB, (2, 5), generator=gen)
        assert torch.allclose(model.read_block(probe, state), model.forward_block(probe, state).hidden, atol=1e-5)


def test_read_block_offset_moves_the_rows_away_from_the_fam_only():
    """At offset k the rows keep their distances to each other (a block alone gives the same output) and
    are k positions further from the FAM they read (so its output changes)."""
    loaded = tiny_loaded()
    gen = torch.Generator().manual_seed(2)
    probe = torch.randint(0, VOCAB, (1, 5), generator=gen)
    with torch.no_grad():
        alone = FamModel(loaded, FamConfig("bswa", 16, 0, 0))
        state = alone.forward_block(torch.randint(0, VOCAB, (1, 16), generator=gen), alone.initial_state(1)).state
        assert torch.allclose(alone.read_block(probe, state, 7), alone.read_block(probe, state), atol=1e-5)
        fam = FamModel(loaded, FamConfig("fam", 16, 4, 0))
        state = fam.forward_block(torch.randint(0, VOCAB, (1, 16), generator=gen), fam.initial_state(1)).state
        assert not torch.allclose(fam.read_block(probe, state, 7), fam.read_block(probe, state), atol=1e-4)

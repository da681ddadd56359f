"""Optional attention back ends agree with the default SDPA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import random_ids

from famviz import FamConfig, Stream
from famviz.core.attention import WindowLayout, attend, attend_split, available_backends, sdpa_kernel

LAYOUTS = [
    WindowLayout(6, 3, 5),
    WindowLayout(0, 4, 7),
    WindowLayout(8, 0, 8),
    WindowLayout(0, 0, 5),
    WindowLayout(0, 4, 0),
]


def qkv(layout: WindowLayout, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, layout.n_queries, 16, generator=g)
    return q, torch.randn(2, 2, layout.n_keys, 16, generator=g), torch.randn(2, 2, layout.n_keys, 16, generator=g)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_split_form_equals_masked_sdpa(layout):
    """The two-call decomposition used for flash-attn is exactly the window mask."""
    q, k, v = qkv(layout)
    reference, _ = attend(q, k, v, layout, 0.25)
    torch.testing.assert_close(attend_split(q, k, v, layout, 0.25, sdpa_kernel), reference, atol=1e-5, rtol=1e-5)


PARTIAL_LAYOUTS = [
    WindowLayout(6, 3, 5, fam_queries=False),  # a side read of the FAM: only the block's tokens ask
    WindowLayout(0, 4, 7, first_query=3),  # the end of a block begun: FAM rows and tokens 3.. ask
    WindowLayout(2, 0, 6, first_query=5),
]


@pytest.mark.parametrize("layout", PARTIAL_LAYOUTS, ids=str)
def test_a_window_where_some_rows_ask_is_those_rows_of_the_whole_window(layout):
    """Leaving query rows out changes nothing for the rows that ask: the same mask rows, the same outputs,
    in the masked SDPA form and in the split form flash-attn uses."""
    from dataclasses import replace

    from famviz.core.attention import window_mask

    whole = replace(layout, fam_queries=True, first_query=0)
    q, k, v = qkv(whole)
    f = whole.fam
    asking = [*range(f)] * layout.fam_queries + [*range(f + layout.first_query, f + whole.block)]
    assert layout.n_queries == len(asking)
    torch.testing.assert_close(window_mask(layout), window_mask(whole)[asking])
    reference, _ = attend(q, k, v, whole, 0.25)
    partial, _ = attend(q[:, :, asking], k, v, layout, 0.25)
    torch.testing.assert_close(partial, reference[:, :, asking], atol=1e-6, rtol=1e-6)
    split = attend_split(q[:, :, asking], k, v, layout, 0.25, sdpa_kernel)
    torch.testing.assert_close(split, reference[:, :, asking], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every window row"):
        attend(q[:, :, asking], k, v, layout, 0.25, with_stats=True)


@pytest.mark.slow
@pytest.mark.skipif("flex" not in available_backends("cpu"), reason="FlexAttention not available")
def test_flex_stream_equals_sdpa_stream(tiny_llama):
    """FlexAttention compiles on CPU too (slowly: one compile per window shape)."""
    ids = random_ids(40)
    config = FamConfig("fam", 16, 4, 1)
    a = Stream(tiny_llama, config, record=False).run(ids)
    b = Stream(tiny_llama, config, record=False, backend="flex").run(ids)
    np.testing.assert_allclose(b.nll, a.nll, atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif("flex" not in available_backends("cpu"), reason="FlexAttention not available")
def test_every_pass_of_the_engine_honours_the_back_end(tiny_llama):
    """The prompt's run up the stack, a side read of the FAM and the end of a block begun all go through
    the chosen back end and agree with SDPA."""
    from famviz.core.fam_model import FamModel

    config = FamConfig("fam", 16, 4, 0)
    sdpa, flex = FamModel(tiny_llama, config), FamModel(tiny_llama, config, backend="flex")
    ids = torch.tensor([random_ids(16)])
    with torch.no_grad():
        for a, b in zip(sdpa.initial_fam(), flex.initial_fam(), strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        state = sdpa.forward_block(ids, sdpa.initial_state()).state
        torch.testing.assert_close(
            flex.read_block(ids[:, :5], state), sdpa.read_block(ids[:, :5], state), atol=1e-4, rtol=1e-4
        )
        collected_a, collected_b = [], []
        sdpa.forward_block(ids[:, :6], state, window_kv=collected_a)
        flex.forward_block(ids[:, :6], state, window_kv=collected_b)
        finished_a = sdpa.finish_block(ids[:, 6:], state, collected_a, prefix=6)
        finished_b = flex.finish_block(ids[:, 6:], state, collected_b, prefix=6)
        torch.testing.assert_close(finished_b.hidden, finished_a.hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    "flash" not in available_backends("cuda" if torch.cuda.is_available() else "cpu"),
    reason="flash-attn needs CUDA and the flash_attn package",
)
def test_flash_attention_equals_sdpa_on_gpu():
    for layout in LAYOUTS[:3]:
        q, k, v = (t.cuda().bfloat16() for t in qkv(layout))
        reference, _ = attend(q, k, v, layout, 0.25)
        flash, _ = attend(q, k, v, layout, 0.25, backend="flash")
        torch.testing.assert_close(flash, reference, atol=2e-2, rtol=2e-2)


def test_unknown_backend_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="back end"):
        Stream(tiny_llama, FamConfig("fam", 8, 2, 1), backend="cuda-magic")


@pytest.mark.parametrize("layout", LAYOUTS + [WindowLayout(0, 4, 1), WindowLayout(1, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_statistics_equal_explicit_softmax(layout, dtype):
    """The trace path (one fused call per key group, merged by log-sum-exp) equals the explicit softmax."""
    from famviz.core.attention import attend_reference_stats, attend_with_stats

    q, k, v = (t.to(dtype) for t in qkv(layout, seed=3))
    q = q * 3  # sharp attention: group masses far from uniform
    out, stats = attend_with_stats(q, k, v, layout, 0.25)
    ref_out, ref = attend_reference_stats(q.float(), k.float(), v.float(), layout, 0.25)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    share_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(stats.block_share, ref.block_share, **share_tol)
    torch.testing.assert_close(stats.fam_share, ref.fam_share, **share_tol)
    torch.testing.assert_close(stats.fam_read, ref.fam_read, **share_tol)
    torch.testing.assert_close(stats.slot_read, ref.slot_read, **share_tol)
    torch.testing.assert_close(stats.slot_received, ref.slot_received, **share_tol)
    torch.testing.assert_close(stats.token_share, ref.token_share, **share_tol)
    if layout.fam and layout.block:  # each slot's reads are a share of its row; the slots' receipts a share of theirs
        assert stats.slot_read.shape == (q.shape[0], layout.fam, layout.block)
        assert (stats.slot_received.sum(-1) <= 1 + 1e-3).all()


def test_explicit_lse_kernel_equals_fused_kernel():
    """The device-independent fallback (used off CPU) agrees with the fused CPU kernel, causal or not."""
    from famviz.core.attention import _attention_with_lse, _attention_with_lse_reference

    q, k, v = qkv(WindowLayout(0, 0, 9), seed=1)
    for causal in (False, True):
        out, lse = _attention_with_lse(q, k, v, 0.25, causal)
        ref_out, ref_lse = _attention_with_lse_reference(q, k, v, 0.25, causal)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)

"""Correctness of the FAM engine on tiny random models (fast, float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from famviz import FamConfig, FamModel, Stream
from famviz.core.attention import WindowLayout, attend, window_mask
from famviz.errors import ConfigError

B = 8  # block size used throughout: small, so documents span many blocks
TOL = dict(atol=2e-4, rtol=2e-4)


def random_ids(n: int, vocab: int = 97, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_logits(loaded, config: FamConfig, ids: list[int], fam_prompt=None) -> torch.Tensor:
    """(n, vocab) logits of every position, streamed block by block."""
    fam = FamModel(loaded, config, fam_prompt=fam_prompt)
    state, outputs = fam.initial_state(), []
    with torch.no_grad():
        for s in range(0, len(ids), config.block_size):
            out = fam.forward_block(torch.tensor([ids[s : s + config.block_size]]), state)
            outputs.append(fam.logits(out.hidden)[0])
            state = out.state
    return torch.cat(outputs)


def hf_logits(loaded, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0]


# -- check 1 and 7: full reproduces the model; bswa with enough memory is full ------------------
def test_full_reproduces_hf_logits(tiny_family):
    ids = random_ids(43)
    torch.testing.assert_close(
        engine_logits(tiny_family, FamConfig("full", B, 0, 0), ids), hf_logits(tiny_family, ids), **TOL
    )


def test_bswa_with_memory_covering_document_is_full(tiny_family):
    ids = random_ids(43)  # 6 blocks, the last partial
    full = engine_logits(tiny_family, FamConfig("full", B, 0, 0), ids)
    bswa = engine_logits(tiny_family, FamConfig("bswa", B, 0, mem_blocks=6), ids)
    torch.testing.assert_close(bswa, full, **TOL)


def test_every_mode_runs_on_every_family(tiny_family):
    ids = random_ids(30)
    for config in (FamConfig("full", B, 0, 0), FamConfig("bswa", B, 0, 1), FamConfig("fam", B, 4, 1)):
        result = Stream(tiny_family, config).run(ids)
        assert result.tokens == 30 and result.blocks == 4
        assert np.isnan(result.nll[0]) and np.isfinite(result.nll[1:]).all()


# -- check 3: fam with fam_len 0 is bswa ---------------------------------------------------------
def test_fam_without_slots_is_bswa(tiny_llama):
    ids = random_ids(40)
    torch.testing.assert_close(
        engine_logits(tiny_llama, FamConfig("fam", B, 0, 2), ids),
        engine_logits(tiny_llama, FamConfig("bswa", B, 0, 2), ids),
        atol=0,
        rtol=0,
    )


def test_bswa_differs_from_full_once_memory_is_short(tiny_llama):
    ids = random_ids(40)
    full = engine_logits(tiny_llama, FamConfig("full", B, 0, 0), ids)
    bswa = engine_logits(tiny_llama, FamConfig("bswa", B, 0, 1), ids)
    torch.testing.assert_close(bswa[: 2 * B], full[: 2 * B], **TOL)  # window still covers everything
    assert (bswa[2 * B :] - full[2 * B :]).abs().max() > 1e-2


# -- check 4: mask semantics by perturbation -----------------------------------------------------
MODES = [
    FamConfig("full", B, 0, 0),
    FamConfig("bswa", B, 0, 1),
    FamConfig("fam", B, 4, 0),
    FamConfig("fam", B, 4, 1),
    FamConfig("sink", B, 0, 1, sink_tokens=3),
]


@pytest.mark.parametrize("config", MODES, ids=lambda c: f"{c.mode}-m{c.mem_blocks}")
def test_changing_a_token_never_changes_earlier_outputs(tiny_llama, config):
    ids = random_ids(40)
    base = engine_logits(tiny_llama, config, ids)
    for changed_at in (3, 13, 21):
        other = list(ids)
        other[changed_at] = (other[changed_at] + 1) % 97
        perturbed = engine_logits(tiny_llama, config, other)
        torch.testing.assert_close(perturbed[:changed_at], base[:changed_at], atol=0, rtol=0)
        assert (perturbed[changed_at:] - base[changed_at:]).abs().max() > 1e-4


def test_bswa_forgets_tokens_older_than_the_window(tiny_llama):
    """A block's receptive field is n_layers·mem_blocks blocks back (cached keys of the previous
    block were computed while the block before it was visible); older tokens cannot matter."""
    n_layers = tiny_llama.config.num_hidden_layers
    for mem_blocks in (0, 1):
        config = FamConfig("bswa", B, 0, mem_blocks=mem_blocks)
        ids = random_ids(6 * B)
        other = list(ids)
        other[2] = (other[2] + 1) % 97  # a token of block 0
        base, perturbed = engine_logits(tiny_llama, config, ids), engine_logits(tiny_llama, config, other)
        first_blind = (1 + n_layers * mem_blocks) * B
        torch.testing.assert_close(perturbed[first_blind:], base[first_blind:], atol=0, rtol=0)
        assert (perturbed[2:first_blind] - base[2:first_blind]).abs().max() > 1e-4


def test_fam_carries_old_tokens_without_memory_blocks(tiny_llama):
    config = FamConfig("fam", B, 4, mem_blocks=0)
    ids = random_ids(6 * B)
    other = list(ids)
    other[2] = (other[2] + 1) % 97
    base, perturbed = engine_logits(tiny_llama, config, ids), engine_logits(tiny_llama, config, other)
    assert (perturbed[5 * B :] - base[5 * B :]).abs().max() > 1e-4  # only the FAM links block 0 to block 5


def test_mask_table():
    layout = WindowLayout(memory=5, fam=3, block=4)
    mask = window_mask(layout)
    assert mask.shape == (7, 12)
    assert not mask[:3, :5].any()  # FAM rows never see memory
    assert mask[:3, 5:].all()  # ... but all FAM and the whole block
    assert mask[3:, :8].all()  # block tokens see memory and FAM
    assert torch.equal(mask[3:, 8:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_fam_rows_ignore_memory_contents(tiny_llama):
    """Changing cached memory K/V changes block outputs but not layer 0's new FAM: FAM rows do not
    attend to memory (deeper FAMs read block tokens whose lower layers did see memory)."""
    fam = FamModel(tiny_llama, FamConfig("fam", B, 4, 1))
    ids = torch.tensor([random_ids(B)])
    with torch.no_grad():
        state = fam.forward_block(ids, fam.initial_state()).state
        noisy = dataclasses.replace(
            state,
            mem_k=tuple(k + torch.randn_like(k) for k in state.mem_k),
            mem_v=tuple(v + torch.randn_like(v) for v in state.mem_v),
        )
        a, b = fam.forward_block(ids, state), fam.forward_block(ids, noisy)
    torch.testing.assert_close(a.state.fam[0], b.state.fam[0], atol=0, rtol=0)
    assert (a.hidden - b.hidden).abs().max() > 1e-3


# -- FAM specifics -------------------------------------------------------------------------------
def test_initial_fam_is_prompt_run_up_the_stack(tiny_llama):
    fam = FamModel(tiny_llama, FamConfig("fam", B, 4, 1))
    initial = fam.initial_fam()
    torch.testing.assert_close(initial[0][0], fam.fam_prompt)  # F^0_0 = P
    # F^{l+1}_0 = layer_l(F^l_0) with bidirectional attention among the FAM rows only
    layer = tiny_llama.model.model.layers[0]
    h = initial[0]
    pos = torch.arange(4)[None]
    cos, sin = tiny_llama.model.model.rotary_emb(h, pos)
    no_mask = torch.zeros(1, 1, 4, 4)  # explicit all-visible mask: HF treats None as causal
    attn_out, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=(cos, sin), attention_mask=no_mask)
    a = h + attn_out
    torch.testing.assert_close(initial[1], a + layer.mlp(layer.post_attention_layernorm(a)), **TOL)


def test_first_fam_update_drops_the_residual(tiny_llama):
    """Doubling the initial FAM's residual path only matters if the residual is used."""
    fam = FamModel(tiny_llama, FamConfig("fam", B, 4, 0))
    ids = torch.tensor([random_ids(B)])
    with torch.no_grad():
        fresh = fam.initial_state()
        first = fam.forward_block(ids, fresh)
        assert fresh.fam_fresh and not first.state.fam_fresh
        kept = fam.forward_block(ids, dataclasses.replace(fresh, fam_fresh=False))
    # with the residual kept the new FAM differs by exactly the old FAM at layer 0's attention residual
    assert (kept.state.fam[0] - first.state.fam[0]).abs().max() > 1e-3


def test_positions_are_rebased_in_bounded_modes(tiny_llama):
    """A window far into an unbounded stream computes exactly what it computes near the start."""
    for config in (FamConfig("bswa", B, 0, 1), FamConfig("fam", B, 4, 1)):
        fam = FamModel(tiny_llama, config)
        ids = torch.tensor([random_ids(B)])
        with torch.no_grad():
            state = fam.forward_block(ids, fam.initial_state()).state
            near = fam.forward_block(ids, state)
            far = fam.forward_block(ids, dataclasses.replace(state, position=10**9))
        torch.testing.assert_close(far.hidden, near.hidden, atol=0, rtol=0)


def test_fam_slot_positions_follow_the_previous_block(tiny_llama):
    fam = FamModel(tiny_llama, FamConfig("fam", B, 4, 2))
    state = fam.initial_state()
    with torch.no_grad():
        for _ in range(3):
            state = fam.forward_block(torch.tensor([random_ids(B)]), state).state
    rows_cos, _, mem_cos, _ = fam.window_angles(state.position, state.memory_tokens, 4, B)
    # window positions: memory 0..15, FAM 12..15 (last 4 of the previous block), block 16..23
    expected_rows, _ = tiny_llama.model.model.rotary_emb(
        torch.empty(0), torch.cat([torch.arange(12, 16), torch.arange(16, 24)])[None]
    )
    expected_mem, _ = tiny_llama.model.model.rotary_emb(torch.empty(0), torch.arange(0, 16)[None])
    torch.testing.assert_close(rows_cos[0, 0], expected_rows[0])
    torch.testing.assert_close(mem_cos[0, 0], expected_mem[0])


# -- check 5: constant state, pieces == whole, partial block -------------------------------------
def test_state_size_is_constant(tiny_llama):
    for config in (FamConfig("bswa", 4, 0, 2), FamConfig("fam", 4, 3, 2)):
        stream = Stream(tiny_llama, config, record=False)
        stream.feed(random_ids(40))
        after_10 = stream.state.nbytes()
        stream.feed(random_ids(360, seed=1))
        assert stream.result().blocks == 100
        assert stream.state.nbytes() == after_10


def test_full_state_grows(tiny_llama):
    stream = Stream(tiny_llama, FamConfig("full", 4, 0, 0), record=False)
    stream.feed(random_ids(40))
    small = stream.state.nbytes()
    stream.feed(random_ids(40, seed=1))
    assert stream.state.nbytes() > small


@pytest.mark.parametrize("config", MODES, ids=lambda c: f"{c.mode}-m{c.mem_blocks}")
def test_feeding_in_pieces_equals_feeding_whole(tiny_llama, config):
    ids = random_ids(45)
    whole = Stream(tiny_llama, config).run(ids)
    stream = Stream(tiny_llama, config)
    rng = np.random.default_rng(0)
    position = 0
    while position < len(ids):
        size = int(rng.integers(0, 12))
        stream.feed(ids[position : position + size])
        position += size
    pieces = stream.finish()
    np.testing.assert_array_equal(pieces.nll, whole.nll)
    assert pieces.blocks == whole.blocks == 6
    for key in whole.trace.keys:
        np.testing.assert_array_equal(pieces.trace.array(key), whole.trace.array(key))


def test_nll_matches_model_log_probs(tiny_llama):
    ids = random_ids(30)
    result = Stream(tiny_llama, FamConfig("full", B, 0, 0)).run(ids)
    logp = torch.log_softmax(hf_logits(tiny_llama, ids).float(), -1)
    expected = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert np.isnan(result.nll[0])
    np.testing.assert_allclose(result.nll[1:], expected.numpy(), atol=1e-4)


# -- sink mode (StreamingLLM's attention sinks) ----------------------------------------------------
def test_sink_mode_without_sinks_is_bswa(tiny_llama):
    ids = random_ids(43)
    for mem_blocks in (0, 1):
        sink = engine_logits(tiny_llama, FamConfig("sink", B, 0, mem_blocks, sink_tokens=0), ids)
        torch.testing.assert_close(sink, engine_logits(tiny_llama, FamConfig("bswa", B, 0, mem_blocks), ids), **TOL)


@pytest.mark.parametrize("sinks", [43, 100])
def test_sinks_covering_the_document_are_full_attention(tiny_family, sinks):
    ids = random_ids(43)
    sink = engine_logits(tiny_family, FamConfig("sink", B, 0, mem_blocks=0, sink_tokens=sinks), ids)
    torch.testing.assert_close(sink, engine_logits(tiny_family, FamConfig("full", B, 0, 0), ids), **TOL)


def test_sink_mode_keeps_the_first_tokens_and_the_last_blocks(tiny_llama):
    """Memory = the stream's first S tokens, then the last mem_blocks blocks; its size stays bounded; a
    token change in the sinks reaches every later block, one between them and the window does not."""
    config = FamConfig("sink", B, 0, mem_blocks=1, sink_tokens=3)
    fam, state = FamModel(tiny_llama, config), None
    ids = random_ids(8 * B)
    state = fam.initial_state()
    with torch.no_grad():
        first_keys = fam.qkv(0, tiny_llama.model.model.embed_tokens(torch.tensor([ids[:3]])))[1]
        for s in range(0, len(ids), B):
            state = fam.forward_block(torch.tensor([ids[s : s + B]]), state).state
            assert state.memory_tokens == min(s + B, 3 + B)
    torch.testing.assert_close(state.mem_k[0][:, :, :3], first_keys)  # layer 0's keys of tokens 0-2, pre-RoPE
    base = engine_logits(tiny_llama, config, ids)
    for changed, reaches_end in ((1, True), (4, False)):
        other = list(ids)
        other[changed] = (other[changed] + 1) % 97
        moved = (engine_logits(tiny_llama, config, other)[-B:] - base[-B:]).abs().max() > 1e-4
        assert bool(moved) == reaches_end


def test_sink_shares_are_their_own_group_and_sum_to_one(tiny_llama):
    from famviz.core.modes import BLOCK_GROUPS

    result = Stream(tiny_llama, FamConfig("sink", B, 0, mem_blocks=1, sink_tokens=3)).run(random_ids(40))
    share = result.trace.array("block.share")  # (blocks, layers, heads, groups)
    assert result.trace.meta["block_share_groups"] == list(BLOCK_GROUPS)
    np.testing.assert_allclose(share.sum(-1), 1, atol=1e-5)
    sink, memory, fam = (share[..., BLOCK_GROUPS.index(g)] for g in ("sink", "memory", "fam"))
    assert (sink[0] == 0).all() and (sink[1:] > 0).all()  # block 0 has no earlier tokens
    assert (memory[1:] > 0).all() and (fam == 0).all()  # block 1 sees block 0: tokens 0-2 as sinks, 3-7 as memory


def test_sink_stats_match_the_explicit_softmax():
    from famviz.core.attention import attend_reference_stats

    torch.manual_seed(1)
    layout = WindowLayout(memory=6, fam=0, block=5, sink=2)
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    _, fast = attend(q, k, v, layout, 0.25, with_stats=True)
    _, slow = attend_reference_stats(q, k, v, layout, 0.25)
    torch.testing.assert_close(fast.block_share, slow.block_share, atol=1e-5, rtol=1e-5)


# -- attention paths -----------------------------------------------------------------------------
def test_probability_path_equals_sdpa():
    torch.manual_seed(0)
    layout = WindowLayout(memory=6, fam=3, block=5)
    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, 2, 14, 16), torch.randn(2, 2, 14, 16)
    fast, _ = attend(q, k, v, layout, 0.25)
    slow, stats = attend(q, k, v, layout, 0.25, with_stats=True)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    # shares against a direct softmax with repeated KV heads
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    probs = scores.masked_fill(~window_mask(layout), float("-inf")).softmax(-1)
    torch.testing.assert_close(stats.block_share[..., 1], probs[:, :, 3:, :6].sum(-1).mean(-1))
    torch.testing.assert_close(stats.fam_share[..., 1], probs[:, :, :3, 9:].sum(-1).mean(-1))
    torch.testing.assert_close(stats.fam_read, probs[:, :, :3, 9:].mean((1, 2)))


def test_trace_on_and_off_give_the_same_outputs(tiny_llama):
    ids = random_ids(40)
    config = FamConfig("fam", B, 4, 1)
    on, off = Stream(tiny_llama, config).run(ids), Stream(tiny_llama, config, record=False).run(ids)
    np.testing.assert_allclose(on.nll, off.nll, atol=1e-4)
    assert off.trace is None


def test_nll_over_row_chunks_matches_model_log_probs(tiny_llama):
    """Blocks longer than the NLL's row chunk (and not a multiple of it) score every token once."""
    ids = random_ids(150)
    config = FamConfig("bswa", 70, 0, mem_blocks=2)  # memory covers the document: equals full attention
    result = Stream(tiny_llama, config, record=False).run(ids)
    logp = torch.log_softmax(hf_logits(tiny_llama, ids).float(), -1)
    expected = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert FamModel.NLL_ROWS < 70 and np.isnan(result.nll[0])
    np.testing.assert_allclose(result.nll[1:], expected.numpy(), atol=1e-4)


def test_rotation_equals_rotate_half_formula():
    from famviz.core.fam_model import apply_rope

    x, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), x * cos + rotated * sin)


# -- fam_norm: keep (docs/algorithm.md §9) ---------------------------------------------------------
def _stream_fams(loaded, config: FamConfig, ids: list[int]) -> list[tuple[torch.Tensor, ...]]:
    fam = FamModel(loaded, config)
    state, fams = fam.initial_state(), []
    with torch.no_grad():
        for s in range(0, len(ids), config.block_size):
            state = fam.forward_block(torch.tensor([ids[s : s + config.block_size]]), state).state
            fams.append(state.fam)
    return fams


def test_fam_norm_grow_is_the_default_and_not_written_into_records(tiny_llama):
    assert FamConfig().fam_norm == "grow" and "fam_norm" not in FamConfig().to_dict()
    assert FamConfig(fam_norm="keep").to_dict()["fam_norm"] == "keep"
    assert "fam_norm" not in FamConfig("bswa", fam_norm="keep").to_dict()  # no FAM, nothing to keep
    ids = random_ids(40)
    explicit = _stream_fams(tiny_llama, FamConfig("fam", B, 4, 0, fam_norm="grow"), ids)
    default = _stream_fams(tiny_llama, FamConfig("fam", B, 4, 0), ids)
    for a, b in zip(explicit, default, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_fam_norm_keep_holds_each_slot_at_the_norm_of_its_first_write(tiny_llama):
    ids = random_ids(48)  # 6 blocks
    grow = _stream_fams(tiny_llama, FamConfig("fam", B, 4, 0), ids)
    keep = _stream_fams(tiny_llama, FamConfig("fam", B, 4, 0, fam_norm="keep"), ids)
    for layer in range(len(grow[0])):
        torch.testing.assert_close(keep[0][layer], grow[0][layer])  # the first write is the paper's
        first = keep[0][layer].norm(dim=-1)
        for later in keep[1:]:
            torch.testing.assert_close(later[layer].norm(dim=-1), first, rtol=1e-5, atol=1e-6)
    # the second update is the paper's update, rescaled: same direction per slot
    a, b = keep[1][0], grow[1][0]
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(a, b, dim=-1), torch.ones(a.shape[:2]))
    with pytest.raises(ConfigError, match="FAM norm must be one of"):
        FamConfig(fam_norm="shrink")

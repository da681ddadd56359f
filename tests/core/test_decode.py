"""Incremental decoding (famviz.core.decode) equals running whole blocks, in every mode (fast, float32)."""

from __future__ import annotations

import pytest
import torch

from famviz import FamConfig, FamModel
from famviz.core.decode import BlockCursor

B = 8
TOL = dict(atol=2e-4, rtol=2e-4)
CONFIGS = [
    FamConfig(mode="full", block_size=B),
    FamConfig(mode="bswa", block_size=B, mem_blocks=1),
    FamConfig(mode="bswa", block_size=B, mem_blocks=0),
    FamConfig(mode="fam", block_size=B, fam_len=3, mem_blocks=1),
    FamConfig(mode="fam", block_size=B, fam_len=3, mem_blocks=0),
    FamConfig(mode="sink", block_size=B, mem_blocks=0, sink_tokens=3),
    FamConfig(mode="sink", block_size=B, mem_blocks=1, sink_tokens=11),
]


def ids_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def block_logits(fam: FamModel, ids: list[int]):
    """Reference: whole blocks through forward_block; returns logits and the state after each full block."""
    state, logits, states = fam.initial_state(), [], {0: fam.initial_state()}
    with torch.no_grad():
        for s in range(0, len(ids), B):
            out = fam.forward_block(torch.tensor([ids[s : s + B]]), state)
            logits.append(fam.logits(out.hidden)[0])
            state = out.state
            states[s + B] = state
    return torch.cat(logits), states


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-m{c.mem_blocks}")
def test_token_by_token_and_chunks_equal_whole_blocks(tiny_family, config):
    fam = FamModel(tiny_family, config)
    ids = ids_of(29)
    reference, states = block_logits(fam, ids)
    # Start after two full blocks; feed 3 tokens at once, then one by one across two block boundaries.
    cursor = BlockCursor(fam, states[2 * B])
    got = [cursor.extend(ids[2 * B : 2 * B + 3])] + [cursor.extend([t]) for t in ids[2 * B + 3 :]]
    torch.testing.assert_close(torch.cat(got), reference[2 * B :].float(), **TOL)
    assert cursor.position == len(ids)


def test_fork_leaves_the_original_untouched(tiny_llama):
    fam = FamModel(tiny_llama, CONFIGS[3])
    ids = ids_of(20, seed=1)
    reference, states = block_logits(fam, ids)
    cursor = BlockCursor(fam, states[B])
    cursor.extend(ids[B : B + 2])
    side = cursor.fork()
    side.extend(ids_of(9, seed=5))  # crosses a block boundary on the fork only
    torch.testing.assert_close(cursor.extend(ids[B + 2 :]), reference[B + 2 :].float(), **TOL)


def test_greedy_follows_the_argmax_and_stops(tiny_llama):
    fam = FamModel(tiny_llama, CONFIGS[3])
    cursor = BlockCursor(fam, fam.initial_state())
    first = cursor.extend(ids_of(5))[-1]
    out = cursor.fork().greedy(first, max_new_tokens=6)
    assert len(out) <= 6 and out[0] == int(first.argmax())
    # Teacher-forcing the greedy answer reproduces it.
    check = cursor.fork()
    logits = check.extend(out)
    assert [int(first.argmax())] + logits[:-1].argmax(-1).tolist() == out
    assert cursor.fork().greedy(first, max_new_tokens=6, stop=lambda ids: len(ids) == 2) == out[:2]

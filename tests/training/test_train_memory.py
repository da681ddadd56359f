"""Training mechanisms for the memory, on tiny random models: fused projections, read-out probes,
the PassKey curriculum, --init-from, float32 master weights under a bfloat16 model."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from helpers import tiny_loaded, tiny_train_config

from famviz import FamConfig
from famviz.core.fam_model import FamModel
from famviz.core.projections import ProjectionGroup, linear_parts
from famviz.errors import ConfigError
from famviz.training.config import TrainConfig
from famviz.training.data import Example, ExampleStream, Readout
from famviz.training.loop import Trainer, add_lora, loss_postfix, resumed_stage
from famviz.training.loss import LossParts, collate, sequence_loss
from famviz.training.rpo_rsp import initial_training_state

VOCAB = 128


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"rpo": False, "rsp": False, **overrides})  # RPO/RSP off unless asked


class KeyWithProbe:
    """A key token, filler, a question and the key; the read-out probe asks [question, key] after every block."""

    def __init__(self, length: int = 30, readout: bool = True):
        self.length, self.readout = length, readout

    def draw(self, rng: random.Random) -> Example:
        key = rng.randrange(10, 20)
        filler = [rng.randrange(30, VOCAB) for _ in range(self.length - 3)]
        ids = [1, key] + filler + [2, key]
        probe = Readout([2, key], [0.0, 1.0], first=2, last=len(ids) - 2) if self.readout else None
        return Example("passkey", ids, [0.0] * (len(ids) - 1) + [1.0], probe)


# -- fused projections -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_projections_equal_peft_modules_in_value_and_gradient(family):
    """q/k/v and gate/up as one matrix multiply, o and down as groups of one (all with LoRA, accumulated by
    addmm), give the module-by-module results and gradients."""
    loaded = tiny_loaded(family)
    peft_model = add_lora(loaded, rank=4, alpha=None)
    for name, param in peft_model.named_parameters():  # LoRA B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model = FamModel(loaded, FamConfig("fam", 8, 4, 1))
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model.fused_projections = fused
        peft_model.zero_grad(set_to_none=True)
        model.invalidate_initial_fam()
        state = model.initial_state(2)
        total = 0
        for start in range(0, ids.shape[1], 8):
            out = model.forward_block(ids[:, start : start + 8], state)
            state = out.state
            total = total + out.hidden.pow(2).mean()
        total.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((total.detach(), state.fam, grads))
    (loss_a, fam_a, grads_a), (loss_b, fam_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fam_a, fam_b, strict=True))
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name


def test_fused_group_falls_back_for_anything_but_plain_lora():
    loaded = tiny_loaded()
    add_lora(loaded, rank=4, alpha=None)
    attn = FamModel(loaded, FamConfig("fam", 8, 4, 0)).layers[0].self_attn
    assert linear_parts(attn.q_proj) is not None and len(linear_parts(attn.q_proj).lora) == 1
    attn.q_proj.lora_dropout["default"] = torch.nn.Dropout(0.5)
    attn.q_proj.train()
    assert linear_parts(attn.q_proj) is None  # dropout in training: computed module by module
    group = ProjectionGroup([attn.q_proj, attn.k_proj])
    x = torch.randn(1, 3, attn.q_proj.in_features)
    torch.manual_seed(0)
    expected = [attn.q_proj(x), attn.k_proj(x)]
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(group(x), expected, strict=True))


def test_fused_group_follows_a_change_of_the_frozen_weights():
    """The concatenated copy is rebuilt when a weight changes (an adapter merged in place, say)."""
    linear = [torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(6, 2, bias=True)]
    for module in linear:
        module.requires_grad_(False)
    group = ProjectionGroup(linear)
    x = torch.randn(3, 6)
    group(x)
    with torch.no_grad():
        linear[0].weight.add_(1.0)
    assert all(torch.allclose(a, m(x)) for a, m in zip(group(x), linear, strict=True))


# -- read-out probes ---------------------------------------------------------------------------------
def test_readout_probes_leave_the_main_stream_unchanged_and_add_their_loss(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    example = KeyWithProbe().draw(random.Random(0))
    ids, weights, readout = collate([example], pad_id=0, device="cpu")
    assert readout is not None and readout.first.tolist() == [2] and readout.last.tolist() == [len(example.ids) - 2]
    with torch.no_grad():
        state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
        plain = sequence_loss(trainer.fam_model, ids, weights, state)
        probed = sequence_loss(trainer.fam_model, ids, weights, state, readout=readout)
    assert all(torch.equal(a, b) for a, b in zip(plain.state.fam, probed.state.fam, strict=True))
    # 32 tokens in blocks of 8: block ends 8, 16, 24 lie within [2, 30], 32 does not: three probes of one answer
    assert plain.count == 1 and probed.count == 4
    # the probed loss is the mean over the main answer and the three probe answers, each a fresh read of the FAM
    with torch.no_grad():
        manual, s = [], state
        for start in range(0, 24, 8):
            s = trainer.fam_model.forward_block(ids[:, start : start + 8], s).state
            logits = trainer.fam_model.logits(trainer.fam_model.read_block(readout.ids, s))[0, 0]
            manual.append(float(torch.nn.functional.cross_entropy(logits[None], readout.ids[0, 1:])))
    assert probed.loss.item() == pytest.approx((plain.loss.item() + sum(manual)) / 4, rel=1e-5)
    assert probed.parts.main == pytest.approx(plain.loss.item(), rel=1e-5)
    assert probed.parts.readout == pytest.approx(sum(manual) / 3, rel=1e-5)
    assert plain.parts.readout is None and plain.parts.probe_count == 0


def test_split_readout_probes_read_the_answer_from_the_fam_the_question_wrote(tmp_path):
    """readout_split s: the probe's first s tokens run as a block of their own (updating the FAM), the rest
    at the start of the next block reads that FAM alone: a round-length question, asked after every block."""
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    example = KeyWithProbe().draw(random.Random(0))
    probe = Readout([2, 3, 4, example.ids[1], 5], [0.0, 0.0, 0.0, 1.0, 1.0], first=2, last=len(example.ids) - 2)
    ids, weights, readout = collate([Example("passkey", example.ids, example.weights, probe)], pad_id=0, device="cpu")
    fam = trainer.fam_model
    with torch.no_grad():
        state = initial_training_state(fam, 1, trainer.prompt, None)
        plain = sequence_loss(fam, ids, weights, state)
        split = sequence_loss(fam, ids, weights, state, readout=readout, readout_split=3)
        manual, s = [], state
        for start in range(0, 24, 8):
            s = fam.forward_block(ids[:, start : start + 8], s).state
            asked = fam.forward_block(readout.ids[:, :3], s)
            rest = fam.read_block(readout.ids[:, 3:], asked.state)
            logits = fam.logits(torch.cat([asked.hidden, rest], dim=1)[0, 2:4])
            manual.append(float(torch.nn.functional.cross_entropy(logits, readout.ids[0, 3:5], reduction="sum")))
        unsplit = sequence_loss(fam, ids, weights, state, readout=readout)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state.fam, split.state.fam, strict=True)
    )  # the stream is untouched
    assert split.count == 1 + 3 * 2
    assert split.parts.readout == pytest.approx(sum(manual) / 6, rel=1e-5)
    assert split.parts.readout != pytest.approx(unsplit.parts.readout, rel=1e-3)  # a different question


def test_filled_split_probes_ask_the_question_at_the_end_of_a_block_of_the_streams_text(tmp_path):
    """readout_fill f: the question's block starts with the stream's own next f tokens (a full block with
    f = block - split), so the FAM update that must keep the key reads text as well; block ends whose next
    f tokens reach the question are not asked; the stream itself is untouched."""
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    example = KeyWithProbe().draw(random.Random(0))
    # block ends 8, 16, 24 lie within [2, 28]; with 5 fill tokens only 8 and 16 (24 + 5 passes 28)
    probe = Readout([2, 3, 4, example.ids[1], 5], [0.0, 0.0, 0.0, 1.0, 1.0], first=2, last=28)
    ids, weights, readout = collate([Example("passkey", example.ids, example.weights, probe)], pad_id=0, device="cpu")
    fam = trainer.fam_model
    with torch.no_grad():
        state = initial_training_state(fam, 1, trainer.prompt, None)
        plain = sequence_loss(fam, ids, weights, state)
        filled = sequence_loss(fam, ids, weights, state, readout=readout, readout_split=3, readout_fill=5)
        unfilled = sequence_loss(fam, ids, weights, state, readout=readout, readout_split=3)
        manual, s = [], state
        for start in range(0, 16, 8):
            s = fam.forward_block(ids[:, start : start + 8], s).state
            asked = fam.forward_block(torch.cat([ids[:, start + 8 : start + 13], readout.ids[:, :3]], dim=1), s)
            assert asked.state.position == s.position + 8  # a whole block, as at a round prompt length
            rest = fam.read_block(readout.ids[:, 3:], asked.state)
            logits = fam.logits(torch.cat([asked.hidden[:, 5:], rest], dim=1)[0, 2:4])
            manual.append(float(torch.nn.functional.cross_entropy(logits, readout.ids[0, 3:5], reduction="sum")))
    assert all(torch.equal(a, b) for a, b in zip(plain.state.fam, filled.state.fam, strict=True))
    assert filled.count == 1 + 2 * 2 and unfilled.parts.probe_count == 3 * 2
    assert filled.parts.readout == pytest.approx(sum(manual) / 4, rel=1e-5)


@pytest.mark.parametrize("fresh", [True, False])
def test_finish_block_equals_forward_block_on_the_whole_block_in_value_and_gradient(tmp_path, fresh):
    """A block [prefix of a block already run ; new tokens] computed from that block's window keys/values
    equals running the whole block (under RPO too), and so do the gradients through it."""
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    fam = trainer.fam_model
    fam.position_offsets = torch.tensor([1234.5])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(30, VOCAB, (1, 24), generator=generator)
    prefix, new = ids[:, 8:13], ids[:, 21:24]

    def run(shared: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = initial_training_state(fam, 1, trainer.prompt, None)
        if not fresh:
            state = fam.forward_block(ids[:, :8], state).state
        if shared:
            window_kv: list = []
            fam.forward_block(ids[:, 8:16], state, window_kv=window_kv)  # the stream's block: same first 5 tokens
            out = fam.finish_block(new, state, window_kv, prefix=5)
            hidden = out.hidden
        else:
            out = fam.forward_block(torch.cat([prefix, new], dim=1), state)
            hidden = out.hidden[:, 5:]
        assert out.state.position == state.position + 8 and not out.state.fam_fresh
        loss = hidden.float().pow(2).sum() + sum(f.float().pow(2).sum() for f in out.state.fam)
        grads = torch.autograd.grad(loss, trainer.trainable_parameters, allow_unused=True)
        return torch.cat([hidden.flatten(), *(f.flatten() for f in out.state.fam)]), grads

    shared_values, shared_grads = run(True)
    whole_values, whole_grads = run(False)
    torch.testing.assert_close(shared_values, whole_values, rtol=1e-4, atol=1e-5)
    assert any(g is not None and g.abs().sum() > 0 for g in shared_grads)
    for a, b in zip(shared_grads, whole_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            # Summed in another order (two blocks' keys against one): float32 rounding of a gradient entry that
            # nearly cancels is relative to the tensor's scale, not the entry's (seen: 2.7e-6 of 5e-4 on AVX2).
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    bounded = FamModel(tiny_loaded(), FamConfig(mode="fam", block_size=8, fam_len=4, mem_blocks=1))
    assert not bounded.can_finish_blocks
    with pytest.raises(ValueError, match="no memory blocks"):
        bounded.finish_block(new, bounded.initial_state(), [], prefix=5)


def test_layer_recompute_covers_side_blocks_and_changes_no_value_or_gradient(tmp_path, monkeypatch):
    """With --checkpoint-layers, forward_block, finish_block and read_block all recompute their layers in
    backward (one checkpoint per layer each), with the values and gradients of keeping the activations."""
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    fam = trainer.fam_model
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(30, VOCAB, (1, 16), generator=generator)
    probe = torch.randint(30, VOCAB, (1, 3), generator=generator)
    checkpoints = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: checkpoints.append(a[0].__name__) or original(*a, **k)
    )

    def run(recompute: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fam.checkpoint_layers = recompute
        state = initial_training_state(fam, 1, trainer.prompt, None)
        window_kv: list = []
        state = fam.forward_block(ids[:, :8], state, window_kv=window_kv).state
        finished = fam.finish_block(probe, initial_training_state(fam, 1, trainer.prompt, None), window_kv, prefix=5)
        read = fam.read_block(probe, state)
        outputs = [finished.hidden, read, *finished.state.fam, *state.fam]
        loss = sum(o.float().pow(2).sum() for o in outputs)
        grads = torch.autograd.grad(loss, trainer.trainable_parameters, allow_unused=True)
        return torch.cat([o.flatten() for o in outputs]), grads

    kept_values, kept_grads = run(False)
    assert checkpoints == []
    recomputed_values, recomputed_grads = run(True)
    layers = len(fam.layers)
    assert checkpoints == ["_layer"] * (3 * layers)  # the block, the finished block, the side read: each layer once
    torch.testing.assert_close(recomputed_values, kept_values)
    for a, b in zip(recomputed_grads, kept_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_filled_probes_share_the_next_blocks_rows_instead_of_running_a_block_of_their_own(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    example = KeyWithProbe().draw(random.Random(0))
    probe = Readout([2, 3, 4, example.ids[1], 5], [0.0, 0.0, 0.0, 1.0, 1.0], first=2, last=28)
    ids, weights, readout = collate([Example("passkey", example.ids, example.weights, probe)], pad_id=0, device="cpu")
    fam = trainer.fam_model
    blocks = []
    forward_block = fam.forward_block
    monkeypatch.setattr(fam, "forward_block", lambda *a, **k: blocks.append(1) or forward_block(*a, **k))
    state = initial_training_state(fam, 1, trainer.prompt, None)
    with torch.no_grad():
        sequence_loss(fam, ids, weights, state, readout=readout, readout_split=3, readout_fill=5)
    assert len(blocks) == 4  # the stream's four blocks only; the two filled probes reuse blocks 2 and 3


def test_shared_rows_give_the_loss_of_filled_blocks_of_their_own_for_a_padded_batch(tmp_path, monkeypatch):
    """Two rows of different lengths whose probes are asked at different block ends: the same loss and
    gradients whether the filled question blocks share the next block's rows or run on their own."""
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe())
    fam = trainer.fam_model
    examples = []
    for seed, length, first, last in ((0, 40, 2, 36), (1, 23, 9, 22)):
        e = KeyWithProbe(length).draw(random.Random(seed))
        probe = Readout([2, 3, 4, e.ids[1], 5], [0.0, 0.0, 0.0, 1.0, 1.0], first=first, last=last)
        examples.append(Example("passkey", e.ids, e.weights, probe))
    ids, weights, readout = collate(examples, pad_id=0, device="cpu")

    def run() -> tuple[float, LossParts, list[torch.Tensor]]:
        state = initial_training_state(fam, 2, trainer.prompt, None)
        result = sequence_loss(fam, ids, weights, state, readout=readout, readout_split=3, readout_fill=5)
        return result.loss.item(), result.parts, torch.autograd.grad(result.loss, [trainer.prompt])

    shared_loss, shared_parts, shared_grad = run()
    monkeypatch.setattr(type(fam), "can_finish_blocks", property(lambda self: False))
    own_loss, own_parts, own_grad = run()
    assert shared_parts.probe_count == own_parts.probe_count > 0
    assert shared_loss == pytest.approx(own_loss, rel=1e-5)
    torch.testing.assert_close(shared_grad[0], own_grad[0], rtol=1e-3, atol=1e-6)


def test_trainer_fills_split_probes_only_when_asked(tmp_path):
    probe = Readout([2, 3, 4, 7, 8, 9], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], first=2, last=20)
    drawn = [Example("passkey", [1] * 30, [0.0] * 29 + [1.0], probe)]
    data = type("Data", (), {"draw": lambda self, rng: drawn[0]})()
    filled = Trainer(tiny_config(tmp_path, readout_split=1.0, readout_fill=1.0), loaded=tiny_loaded(), data=data)
    record = filled.train_step()
    assert record["readout_fill"] == 8 - record["readout_split"]
    plain = Trainer(tiny_config(tmp_path / "plain", readout_split=1.0), loaded=tiny_loaded(), data=data)
    assert plain.train_step()["readout_fill"] == 0
    with pytest.raises(ConfigError, match="--readout-split"):
        tiny_config(tmp_path, readout_fill=0.5).validate()


def test_fam_growth_is_measured_always_and_penalised_only_when_weighted(tmp_path):
    """fam_growth = mean over updates 2..T and layers of max(0, Δ log mean slot norm); weight 0 leaves the
    loss exactly as it was, weight λ adds λ · growth."""
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyWithProbe(60))
    example = KeyWithProbe(60).draw(random.Random(0))
    ids, weights, _ = collate([example], pad_id=0, device="cpu")
    fam = trainer.fam_model
    with torch.no_grad():
        state = initial_training_state(fam, 1, trainer.prompt, None)
        plain = sequence_loss(fam, ids, weights, state)
        penalised = sequence_loss(fam, ids, weights, state, fam_growth_weight=0.5)
        log_norms, s = [], state
        for start in range(0, ids.shape[1], 8):
            s = fam.forward_block(ids[:, start : start + 8], s).state
            log_norms.append(torch.stack([f[0].norm(dim=-1).mean() for f in s.fam]).log())
        growth = torch.stack([torch.relu(b - a).mean() for a, b in itertools.pairwise(log_norms)]).mean()
    assert len(log_norms) == 8 and float(growth) > 0
    assert float(plain.penalty) == 0 and plain.loss.item() == pytest.approx(plain.parts.main, rel=1e-6)
    assert plain.parts.fam_growth == pytest.approx(float(growth), rel=1e-5) == penalised.parts.fam_growth
    assert penalised.loss.item() == pytest.approx(plain.loss.item() + 0.5 * float(growth), rel=1e-5)
    short = KeyWithProbe(23).draw(random.Random(1))  # 3 blocks, padded with 5 blocks in a batch with the long row
    with torch.no_grad():
        alone = []
        for e in (example, short):
            row_ids, row_weights, _ = collate([e], pad_id=0, device="cpu")
            row_state = initial_training_state(fam, 1, trainer.prompt, None)
            alone.append(sequence_loss(fam, row_ids, row_weights, row_state).parts)
        batch_ids, batch_weights, _ = collate([example, short], pad_id=0, device="cpu")
        both = sequence_loss(fam, batch_ids, batch_weights, initial_training_state(fam, 2, trainer.prompt, None)).parts
    # the short row's padding blocks do not count: the batch's growth is its rows' growths together
    assert both.growth_count == alone[0].growth_count + alone[1].growth_count == 7 + 2
    assert both.growth_sum == pytest.approx(alone[0].growth_sum + alone[1].growth_sum, rel=1e-5)
    with torch.no_grad():  # one block: no update after the first, nothing to measure
        one = sequence_loss(fam, ids[:, :8], weights[:, :8], state, fam_growth_weight=0.5)
    assert one.parts.fam_growth is None and float(one.penalty) == 0


def test_the_growth_penalty_trains_the_fam_to_grow_less(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, fam_growth_weight=1.0), loaded=tiny_loaded(), data=KeyWithProbe(60))
    example = KeyWithProbe(60).draw(random.Random(0))
    ids, weights, _ = collate([example], pad_id=0, device="cpu")
    no_tokens = weights * 1e-9  # the penalty alone, in effect (a weighted answer marks the row's real blocks)
    growth = []
    for _ in range(4):
        state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
        result = sequence_loss(trainer.fam_model, ids, no_tokens, state, fam_growth_weight=1.0)
        growth.append(result.parts.fam_growth)
        trainer.optimizer.zero_grad()
        result.loss.backward()
        trainer.optimizer.step()
    assert growth[-1] < 0.8 * growth[0], growth
    record = trainer.train_step()
    assert record["fam_growth"] is not None  # logged every step
    with pytest.raises(ConfigError, match="--fam-growth-weight"):
        tiny_config(tmp_path, fam_growth_weight=-1).validate()


def test_trainer_draws_split_points_after_the_question_and_before_the_answer_ends(tmp_path):
    probe = Readout([2, 3, 4, 7, 8, 9], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], first=2, last=20)
    drawn = [Example("passkey", [1] * 30, [0.0] * 29 + [1.0], probe)]
    three_token_answers = type("Data", (), {"draw": lambda self, rng: drawn[0]})()
    trainer = Trainer(tiny_config(tmp_path, readout_split=1.0), loaded=tiny_loaded(), data=three_token_answers)
    assert {trainer._readout_split(drawn) for _ in range(50)} == {3, 4}
    assert trainer.train_step()["readout_split"] > 0  # a whole step with split probes runs; the log says so
    trainer.config.readout_split = 0.0
    assert trainer._readout_split(drawn) == 0
    assert trainer.train_step()["readout_split"] == 0


def test_readout_probes_train_the_memory_faster(tmp_path):
    """With probes after every block the same steps lower the held-out answer loss more than without."""
    losses = {}
    for readout in (False, True):
        trainer = Trainer(
            tiny_config(tmp_path / str(readout), steps=25, lr=2e-2),
            loaded=tiny_loaded(),
            data=KeyWithProbe(readout=readout),
        )
        for _ in range(25):
            trainer.train_step()
        held = [KeyWithProbe(readout=False).draw(random.Random(1000 + i)) for i in range(16)]
        total = 0.0
        with torch.no_grad():
            for example in held:
                ids, weights, _ = collate([example], 0, "cpu")
                state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
                total += float(sequence_loss(trainer.fam_model, ids, weights, state).loss)
        losses[readout] = total / len(held)
    assert losses[True] < losses[False], losses


def test_passkey_examples_carry_a_probe_from_the_key_to_the_question():
    from helpers import bundled_tokenizer

    from famviz.probes.passkey import question_ids

    tokenizer = bundled_tokenizer()
    stream = ExampleStream(
        tokenizer, {"passkey": 1.0}, (900, 1000), (10, 20), 4, 0.1, 0.0, passkey_depth_zero=0.0, readout_weight=0.5
    )
    rng = random.Random(5)
    example = stream.draw(rng)
    probe = example.readout
    question = question_ids(tokenizer)
    answer = example.ids[len(example.ids) - sum(w > 0 for w in example.weights) :]
    assert probe.ids == question + answer and probe.weights == [0.0] * len(question) + [0.5] * len(answer)
    assert tokenizer.decode(answer) == f" {example_key(tokenizer, example)}."  # the number, then its end
    key_text = tokenizer.decode(example.ids[: probe.first])
    assert key_text.rstrip().endswith("is the pass key.")  # probes start once the whole key sentence is read
    assert tokenizer.decode(example.ids[probe.last :]).strip().startswith("What is the pass key?")
    assert ExampleStream(tokenizer, {"passkey": 1.0}, (900, 1000), (10, 20), 4, 0.1, 0.0).draw(rng).readout is None


def example_key(tokenizer, example) -> int:
    import re

    return int(re.search(r"The pass key is (\d+)\.", tokenizer.decode(example.ids)).group(1))


def test_passkey_answers_end_the_number_and_the_held_out_score_requires_it():
    """Without a target after the digits a tuned model kept writing digits (" 384333333" for 3843), which
    greedy scoring reads as a wrong integer: the training answer closes the number."""
    from helpers import bundled_tokenizer

    from famviz.probes.passkey import make_passkey_document

    tokenizer = bundled_tokenizer()
    document = make_passkey_document(tokenizer, 300, seed=3)
    assert tokenizer.decode(document.answer_ids + document.closing_ids) == f" {document.key}."
    whole = tokenizer(document.text + f" {document.key}.", add_special_tokens=False)["input_ids"]
    assert whole[-len(document.closing_ids) - len(document.answer_ids) :] == document.answer_ids + document.closing_ids
    example = ExampleStream(tokenizer, {"passkey": 1.0}, (300, 400), (10, 20), 4, 0.1, 0.0).draw(random.Random(1))
    scored = [t for t, w in zip(example.ids, example.weights, strict=True) if w > 0]
    assert tokenizer.decode(scored) == f" {example_key(tokenizer, example)}."


def test_the_held_out_score_fails_a_model_that_does_not_end_the_number(monkeypatch):
    """passkey_teacher_forced counts a trial only when the closing token is the argmax too; its log p is
    the key's tokens only."""
    from helpers import bundled_tokenizer

    import famviz.training.loss as train_loss

    tokenizer = bundled_tokenizer()
    seen = {}

    def fake_scores(fam_model, ids, weights, state):
        n = int((weights > 0).sum())
        seen["n"] = n
        hits = torch.ones(n, dtype=torch.bool)
        hits[-1] = seen["closing_right"]
        return hits, torch.full((n,), -0.5)

    monkeypatch.setattr(train_loss, "_score_tokens", fake_scores)
    monkeypatch.setattr(train_loss, "initial_training_state", lambda *a, **k: None)
    fake_model = type("M", (), {"device": torch.device("cpu")})()
    document = __import__("famviz.probes.passkey", fromlist=["x"]).make_passkey_document(tokenizer, 200, seed=1_000_000)
    for closing_right, accuracy in ((True, 1.0), (False, 0.0)):
        seen["closing_right"] = closing_right
        result = train_loss.passkey_teacher_forced(fake_model, tokenizer, None, 200, 1, seed=1_000_000)
        assert result["accuracy"] == accuracy
    assert seen["n"] == len(document.answer_ids) + len(document.closing_ids)
    assert result["key_logprob"] == pytest.approx(-0.5 * len(document.answer_ids))


def test_aligned_passkey_lengths_put_the_answer_at_a_block_boundary():
    from helpers import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    stream = ExampleStream(
        tokenizer, {"passkey": 1.0}, (300, 1100), (10, 20), 4, 0.1, 0.0, passkey_aligned=1.0, block_size=256
    )
    rng = random.Random(2)
    lengths = [stream._passkey_length(rng) for _ in range(200)]
    assert all(256 * k - 6 <= n <= 256 * k for n in lengths for k in [round(n / 256)])
    assert {round(n / 256) for n in lengths} == {2, 3, 4}  # every whole block count the range allows
    uniform = ExampleStream(tokenizer, {"passkey": 1.0}, (300, 1100), (10, 20), 4, 0.1, 0.0, block_size=256)
    assert len({uniform._passkey_length(rng) for _ in range(200)}) > 100
    with pytest.raises(ConfigError, match="passkey-aligned"):
        TrainConfig(out="x", passkey_aligned=1.5).validate()


# -- curriculum --------------------------------------------------------------------------------------
def test_curriculum_draws_up_to_n_blocks_and_advances_on_the_threshold(tmp_path, monkeypatch):
    import famviz.training.loop as train_loop

    class Lengths:
        passkey_tokens = (3, 100)

        def draw(self, rng):
            return KeyWithProbe(length=rng.randint(*self.passkey_tokens)).draw(rng)

    data = Lengths()
    trainer = Trainer(tiny_config(tmp_path, curriculum="2,4", passkey_tokens="5-9"), loaded=tiny_loaded(), data=data)
    trainer.train_step()
    assert data.passkey_tokens == (5, 16)  # stage 1: up to 2 blocks of 8 tokens
    scores = iter([0.5, 0.9])
    asked = []

    def fake_eval(model, tokenizer, prompt, length, trials, seed, depth=0.0):
        asked.append(length)
        return {"length": length, "depth": depth, "trials": trials, "accuracy": next(scores), "key_logprob": -1.0}

    monkeypatch.setattr(train_loop, "passkey_teacher_forced", fake_eval)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert asked == [16, 16] and not first["advanced"] and second["advanced"]
    trainer.train_step()
    assert data.passkey_tokens == (5, 32) and trainer.curriculum_blocks == 4
    assert resumed_stage(trainer.history + [first, second], [2, 4]) == 1
    assert resumed_stage([first], [2, 4]) == 0


def test_uniform_lengths_give_uniform_block_counts():
    rng = random.Random(0)
    counts = [0] * 4
    for _ in range(4000):
        counts[(rng.randint(1, 32) - 1) // 8] += 1
    assert max(counts) - min(counts) < 200


@pytest.mark.parametrize("spec", ["4,2", "0,2", "a,b", ","])
def test_bad_curricula_are_refused(tmp_path, spec):
    with pytest.raises(ConfigError):
        tiny_config(tmp_path, curriculum=spec).validate()


# -- --init-from -------------------------------------------------------------------------------------
def test_init_from_loads_the_adapter_exactly(tmp_path):
    from famviz.training.checkpoints import trainable_state

    source = Trainer(tiny_config(tmp_path / "a", steps=3), loaded=tiny_loaded(), data=KeyWithProbe())
    source.run(progress=False)
    started = Trainer(
        tiny_config(tmp_path / "b", init_from=str(tmp_path / "a" / "run")), loaded=tiny_loaded(), data=KeyWithProbe()
    )
    a = trainable_state(source.peft_model, source.prompt)
    b = trainable_state(started.peft_model, started.prompt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not started.optimizer.state_dict()["state"]  # a fresh optimizer
    with pytest.raises(ConfigError, match="rank"):
        Trainer(
            tiny_config(tmp_path / "c", init_from=str(tmp_path / "a" / "run"), lora_rank=2),
            loaded=tiny_loaded(),
            data=KeyWithProbe(),
        )


def test_a_card_records_the_whole_lineage_of_init_from_runs(tmp_path):
    """Each run's card holds its source's brief with that one's source inside it, newest first in the
    markdown; a source card written before lineages were nested is completed from the directories."""
    import json

    previous = None
    for name in ("a", "b", "c", "d"):
        config = tiny_config(tmp_path / name, steps=1, init_from=previous)
        Trainer(config, loaded=tiny_loaded(), data=KeyWithProbe()).run(progress=False)
        previous = str(tmp_path / name / "run")
        if name == "c":  # as cards were written before: the source's brief without its own source
            path = tmp_path / "c" / "run" / "training_card.json"
            card = json.loads(path.read_text())
            del card["initialised_from"]["initialised_from"]
            path.write_text(json.dumps(card))
    card = json.loads((tmp_path / "d" / "run" / "training_card.json").read_text())
    chain, origin = [], card["initialised_from"]
    while origin:
        chain.append(Path(origin["directory"]).parent.name)
        assert origin["steps"] == 1
        origin = origin.get("initialised_from")
    assert chain == ["c", "b", "a"]
    text = (tmp_path / "d" / "run" / "TRAINING_CARD.md").read_text()
    positions = [text.index(str(tmp_path / name / "run")) for name in ("c", "b", "a")]
    assert positions == sorted(positions)  # newest first


# -- mixed precision ---------------------------------------------------------------------------------
def test_bfloat16_model_keeps_float32_master_weights_and_updates(tmp_path):
    trainer = Trainer(
        tiny_config(tmp_path, lr=1e-6, warmup_steps=1), loaded=tiny_loaded(dtype=torch.bfloat16), data=KeyWithProbe()
    )
    assert trainer.loaded.dtype == torch.bfloat16 and trainer.prompt.dtype == torch.float32
    lora = [p for p in trainer.peft_model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    before = trainer.prompt.detach().clone()
    trainer.train_step()
    change = (trainer.prompt.detach() - before).abs()
    # Adam's first step moves every coordinate by about lr: far below bfloat16's resolution at these magnitudes,
    # so a bfloat16 parameter would keep most of them unchanged.
    resolution = before.abs().clamp_min(1e-3) * 2**-8
    assert (change > 0).float().mean() > 0.9 and (change < resolution).float().mean() > 0.9


# -- the training card records every stage -------------------------------------------------------------
def test_card_records_each_stage_and_keeps_evaluations_across_resumes(tmp_path):
    import json
    from dataclasses import replace

    from famviz.io.adapters import card_markdown, read_training_card, write_training_card

    first = tiny_config(tmp_path, steps=2, stage_command="python -m famviz train --out RUN --steps 2")
    Trainer(first, loaded=tiny_loaded(), data=KeyWithProbe()).run(progress=False)
    run = tmp_path / "run"
    card = read_training_card(run)
    card.setdefault("stage_evaluations", []).append({"after_step": 2, "passkey": [], "long_documents": []})
    write_training_card(run, card)  # as `train --evaluate` leaves it after stage 1
    second = replace(first, steps=4, stage_command="python -m famviz train --resume RUN --steps 4")
    Trainer(second, loaded=tiny_loaded(), data=KeyWithProbe()).run(resume=True, progress=False)
    card = read_training_card(run)
    stages = card["stages"]
    assert [(s["stage"], s["first_step"], s["last_step"]) for s in stages] == [(1, 1, 2), (2, 3, 4)]
    assert stages[1]["command"].endswith("--resume RUN --steps 4") and all(s["tokens"] > 0 for s in stages)
    assert card["stage_evaluations"] == [{"after_step": 2, "passkey": [], "long_documents": []}]
    text = card_markdown(card)
    assert "## Stages" in text and "| 2 | 3-4 |" in text and "## Evaluations after stages" in text
    log_lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all("loss" in r or "eval" in r for r in log_lines)


def test_steps_from_before_stage_records_form_a_first_stage():
    from famviz.training.card import stage_summaries

    history = [
        {"step": 1, "loss": 1.0, "tokens": 5, "seconds": 2.0},
        {"step": 1, "eval": {"length": 8, "accuracy": 0.5}},
        {"stage": "start", "from_step": 1, "command": "B"},
        {"step": 2, "loss": 1.0, "tokens": 7, "seconds": 1.0},
    ]
    stages = stage_summaries(history, "A")
    assert [(s["stage"], s["command"], s["first_step"], s["last_step"], s["tokens"]) for s in stages] == [
        (1, "A", 1, 1, 5),
        (2, "B", 2, 2, 7),
    ]
    assert stages[0]["held_out"]["accuracy"] == 0.5 and stages[1]["held_out"] is None


def test_the_progress_bar_shows_the_step_loss_and_a_mean_labelled_with_the_steps_it_averages():
    """Steps 1.107, 7.186, 1.080 read as loss=1.080 and loss(avg3)=3.124, never an unlabelled average."""
    from famviz.training.card import recent_loss

    history = [
        {"stage": "start", "from_step": 0, "command": "A"},
        {"step": 1, "loss": 1.107},
        {"step": 1, "eval": {"accuracy": 0.5}},
        {"step": 2, "loss": 7.186},
        {"step": 3, "loss": 1.080},
    ]
    assert loss_postfix([]) == {} and recent_loss([]) == (None, 0)
    assert loss_postfix(history) == {"loss": "1.080", "loss(avg3)": "3.124"}
    long_run = [{"step": i, "loss": float(i)} for i in range(1, 121)]  # a resumed run: its earlier steps count
    assert recent_loss(long_run) == (pytest.approx(sum(range(71, 121)) / 50), 50)
    assert loss_postfix(long_run) == {"loss": "120.000", "loss(avg50)": "95.500"}


def test_finish_block_equals_forward_block_with_fam_norm_keep(tmp_path):
    """finish_block hands on the same rescaled FAM as forward_block when the FAM norm is kept."""
    trainer = Trainer(tiny_config(tmp_path, fam_norm="keep"), loaded=tiny_loaded(), data=KeyWithProbe())
    fam = trainer.fam_model
    assert fam.config.fam_norm == "keep"
    ids = torch.randint(30, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = fam.forward_block(ids[:, :8], initial_training_state(fam, 1, trainer.prompt, None)).state
        window_kv: list = []
        fam.forward_block(ids[:, 8:16], state, window_kv=window_kv)
        shared = fam.finish_block(ids[:, 21:24], state, window_kv, prefix=5).state.fam
        whole = fam.forward_block(torch.cat([ids[:, 8:13], ids[:, 21:24]], dim=1), state).state.fam
    for a, b, before in zip(shared, whole, state.fam, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.norm(dim=-1), before.norm(dim=-1), rtol=1e-5, atol=1e-5)

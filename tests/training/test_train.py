"""FAM fine-tuning on tiny random models: loss goes down, RPO/RSP do what docs/algorithm.md §5 says, resume is exact."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import replace

import pytest
import torch
from helpers import KeyRecall, assert_one_line_error, run_cli_in_process, tiny_causal_lm, tiny_train_config

from famviz import FamConfig, prepare_model
from famviz.errors import ConfigError
from famviz.training.config import TrainConfig
from famviz.training.data import Example, copy_example, parse_mixture, parse_range
from famviz.training.loop import Trainer
from famviz.training.loss import collate, sequence_loss
from famviz.training.rpo_rsp import StatePassing, TrainingFamModel, draw_position_offsets, initial_training_state
from famviz.training.used_state import PasskeyFiller, UsedStates, read_text_into_fam

VOCAB = 128


def tiny_loaded(seed: int = 0):
    return prepare_model(tiny_causal_lm("llama", vocab_size=VOCAB, seed=seed), tokenizer=None, name="tiny-llama")


def read_recipe_text(tmp_path, text: str) -> dict:
    from famviz.training.recipe import read_recipe

    path = tmp_path / "from-card.toml"
    path.write_text(text)
    return read_recipe(path)


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    return tiny_train_config(tmp_path, **overrides)


def fixed_loss(trainer: Trainer, examples: list[Example]) -> float:
    """Mean loss on fixed examples, each from the learned initial FAM, without RPO."""
    total = 0.0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.ids])
            weights = torch.tensor([example.weights])
            state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
            total += float(sequence_loss(trainer.fam_model, ids, weights, state).loss)
    return total / len(examples)


@pytest.mark.parametrize("mode", ["fam", "bswa"])
def test_a_few_steps_reduce_the_loss(tmp_path, mode):
    data = KeyRecall(answer=5)
    trainer = Trainer(tiny_config(tmp_path, mode=mode, steps=15, rsp=False), loaded=tiny_loaded(), data=data)
    held = [data.draw(random.Random(100 + i)) for i in range(8)]
    before = fixed_loss(trainer, held)
    for _ in range(15):
        trainer.train_step()
    after = fixed_loss(trainer, held)
    assert after < 0.8 * before, (before, after)


def test_only_lora_and_the_prompt_are_trained(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded(), data=KeyRecall())
    frozen = {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in trainer.peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets
    prompt_before = trainer.prompt.detach().clone()
    for _ in range(2):
        trainer.train_step()
    for name, param in trainer.peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert not torch.equal(trainer.prompt, prompt_before)  # the FAM prompt is trained in full


def test_gradient_reaches_the_first_block_through_the_fam(tmp_path):
    """No stop-gradient: the loss on the last block reaches LoRA weights through the first block's FAM update."""
    trainer = Trainer(tiny_config(tmp_path, rpo=False), loaded=tiny_loaded(), data=KeyRecall())
    trainer.fam_model.checkpoint_layers = True
    example = KeyRecall(24).draw(random.Random(0))
    ids = torch.tensor([example.ids])
    first_block = ids[:, :8]
    state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
    out = trainer.fam_model.forward_block(first_block, state)
    fam_after_first = out.state.fam
    loss = sequence_loss(trainer.fam_model, ids[:, 8:], torch.tensor([example.weights[8:]]), out.state).loss
    grads = torch.autograd.grad(loss, fam_after_first[0], allow_unused=True, retain_graph=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    # The LoRA weights' gradient has a part that flows back through the first block's FAM update: cut
    # that path (the same state, detached) and their gradient changes.
    # (LoRA's B starts at zero, so only B's gradient is non-zero at the first step.)
    lora = [p for n, p in trainer.peft_model.named_parameters() if "lora_B" in n and p.requires_grad]
    through = torch.autograd.grad(loss, lora)
    cut = dataclasses.replace(
        out.state,
        fam=tuple(f.detach() for f in out.state.fam),
        mem_k=tuple(k.detach() for k in out.state.mem_k),
        mem_v=tuple(v.detach() for v in out.state.mem_v),
    )
    cut_loss = sequence_loss(trainer.fam_model, ids[:, 8:], torch.tensor([example.weights[8:]]), cut).loss
    without = torch.autograd.grad(cut_loss, lora, allow_unused=True)
    assert torch.allclose(loss, cut_loss)  # same value, only the gradient path differs
    differs = [w is None or not torch.allclose(t, w, atol=1e-7) for t, w in zip(through, without, strict=True)]
    assert lora and all(differs)


# -- Random Position Offset ------------------------------------------------------------------------
def test_bswa_without_memory_skips_unscored_blocks_exactly(tmp_path):
    """BSWA with mem_blocks 0: blocks without a scored prediction reach nothing, so skipping them leaves the
    loss and every gradient unchanged (the BSWA baseline trains on the same data for less compute)."""
    trainer = Trainer(tiny_config(tmp_path, mode="bswa", mem_blocks=0), loaded=tiny_loaded(), data=KeyRecall(length=30))
    assert trainer.fam_model.blocks_independent
    example = KeyRecall(length=30).draw(random.Random(1))
    ids, weights = torch.tensor([example.ids]), torch.tensor([example.weights])
    calls = []
    forward = trainer.fam_model.forward_block
    trainer.fam_model.forward_block = lambda *a, **k: calls.append(1) or forward(*a, **k)
    results = []
    for skip in (True, False):
        trainer.optimizer.zero_grad(set_to_none=True)
        calls.clear()
        state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
        result = sequence_loss(trainer.fam_model, ids, weights, state, skip_unseen=skip)
        loss, final = result.loss, result.state
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.trainable_parameters], len(calls), final))
    (loss_a, grads_a, calls_a, final_a), (loss_b, grads_b, calls_b, final_b) = results
    assert calls_a == 1 and calls_b == 4  # 31 tokens in blocks of 8: only the answer's block is run
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert final_a.position == final_b.position == len(example.ids)


def test_position_offsets_are_uniform_and_zeroed_half_the_time():
    rng = random.Random(0)
    theta = 10000.0
    offsets = torch.cat([draw_position_offsets(rng, 4, theta) for _ in range(1000)])
    zero = (offsets == 0).float().mean().item()
    assert 0.45 < zero < 0.55
    nonzero = offsets[offsets != 0]
    assert nonzero.min() >= 0 and nonzero.max() < 2 * torch.pi * theta
    assert nonzero.max() > 0.9 * 2 * torch.pi * theta  # spread over the whole range


@pytest.mark.parametrize("mode,mem_blocks", [("fam", 0), ("fam", 1), ("bswa", 1)])
def test_rpo_shifts_what_rope_sees_but_not_attention(mode, mem_blocks):
    loaded = tiny_loaded()
    config = FamConfig(mode=mode, block_size=8, fam_len=4, mem_blocks=mem_blocks)
    model = TrainingFamModel(loaded, config)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    state = model.initial_state(2)
    state = model.forward_block(ids, state).state  # a window with memory (when mem_blocks > 0) and a used FAM
    plain_angles = model.window_angles(state.position, state.memory_tokens, model.fam_len, 8)
    plain = model.forward_block(ids, state).hidden
    model.position_offsets = torch.tensor([0.0, 1234.0], dtype=torch.float64)
    shifted_angles = model.window_angles(state.position, state.memory_tokens, model.fam_len, 8)
    shifted = model.forward_block(ids, state).hidden
    # Element 0 has offset 0: the same angles; element 1 sees rotations of positions shifted by 1234.
    assert torch.allclose(shifted_angles[0][0], plain_angles[0][0], atol=1e-6)
    assert not torch.allclose(shifted_angles[0][1], plain_angles[0][0], atol=1e-2)
    position, m, f = state.position, state.memory_tokens, model.fam_len
    rebased = torch.arange(position - f, position + 8) - (position - max(m, f))  # the engine's window positions
    expected_cos, _ = model.decoder.rotary_emb(torch.empty(0), (rebased.double() + 1234.0).float().unsqueeze(0))
    assert torch.allclose(shifted_angles[0][1, 0], expected_cos[0], atol=1e-4)
    # RoPE is relative: the same offset on every query and key leaves attention (nearly) unchanged.
    assert torch.allclose(shifted, plain, atol=2e-3)


def test_the_engine_alone_ignores_a_position_offset():
    """Why RPO needs TrainingFamModel: bounded windows are rebased, so shifting state.position changes nothing."""
    loaded = tiny_loaded()
    model = TrainingFamModel(loaded, FamConfig(mode="fam", block_size=8, fam_len=4, mem_blocks=1))
    assert model.window_angles(16, 8, 4, 8)[0].equal(model.window_angles(16 + 5000, 8, 4, 8)[0])


# -- Random State Passing ------------------------------------------------------------------------------
def test_state_passing_reuses_with_probability_p_and_detaches():
    passing = StatePassing(0.8)
    rng = random.Random(0)
    assert passing.choose(rng) is None  # nothing saved yet
    final = tuple(torch.randn(3, 4, 8, requires_grad=True) * 2 for _ in range(2))
    passing.remember(final)
    assert all(not t.requires_grad and t.shape == (1, 4, 8) for t in passing.saved)
    assert all(torch.equal(s, f[:1].detach()) for s, f in zip(passing.saved, final, strict=True))  # batch element 0
    used = sum(passing.choose(rng) is not None for _ in range(4000)) / 4000
    assert 0.77 < used < 0.83
    assert StatePassing(0.0).choose(rng) is None


def test_training_step_starts_from_the_passed_fam(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, rsp_prob=1.0, batch_size=2), loaded=tiny_loaded(), data=KeyRecall())
    started = []
    original = initial_training_state

    def spy(fam_model, batch, prompt, passed):
        state = original(fam_model, batch, prompt, passed)
        started.append(state)
        return state

    monkeypatch.setattr("famviz.training.loop.initial_training_state", spy)
    trainer.train_step()
    saved = trainer.state_passing.saved
    trainer.train_step()
    first, second = started
    assert first.fam_fresh and not second.fam_fresh  # a passed FAM keeps its residual at the first update
    for layer, fam in enumerate(second.fam):
        assert not fam.requires_grad
        assert torch.equal(fam[0], saved[layer][0]) and torch.equal(fam[1], saved[layer][0])


def test_the_passed_fam_never_read_pad_tokens(tmp_path):
    """With batch > 1 the FAM passed on is that of the batch's longest sequence, whose blocks hold no pads:
    it equals the final FAM of that sequence streamed alone."""
    short = Example("passkey", [1, 5] + [40] * 9 + [2, 5], [0.0] * 12 + [1.0])
    long = Example("passkey", [1, 7] + [50] * 25 + [2, 7], [0.0] * 28 + [1.0])

    class ShortThenLong:  # the shorter drawn first: it would be batch element 0 without the sort
        def __init__(self):
            self.examples = iter([short, long])

        def draw(self, rng):
            return next(self.examples)

    config = tiny_config(tmp_path, batch_size=2, rsp_prob=1.0, rpo=False)
    trainer = Trainer(config, loaded=tiny_loaded(), data=ShortThenLong())
    trainer.optimizer.step = lambda *args, **kwargs: None  # keep the weights: the FAM is compared with them
    trainer.train_step()
    ids, weights, _ = collate([long], trainer.pad_id, "cpu")
    with torch.no_grad():
        state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
        final = sequence_loss(trainer.fam_model, ids, weights, state).state
    saved = trainer.state_passing.saved
    assert all(torch.allclose(s[0], f[0], atol=1e-5) for s, f in zip(saved, final.fam, strict=True))


def test_rsp_off_always_starts_from_the_prompt(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, rsp=False), loaded=tiny_loaded(), data=KeyRecall())
    records = [trainer.train_step() for _ in range(3)]
    assert not any(r["rsp"] for r in records)


# -- used memories -------------------------------------------------------------------------------------
class RandomText:
    """A stand-in for the text corpus of used states: random tokens, drawn from the step's generator."""

    def window(self, rng: random.Random, length: int) -> list[int]:
        return [rng.randrange(30, VOCAB) for _ in range(length)]


def test_reading_text_into_the_fam_is_the_training_forward_and_touches_nothing(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, rpo=False), loaded=tiny_loaded(), data=KeyRecall())
    ids = torch.tensor([RandomText().window(random.Random(1), 3 * 8)])
    before = {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters()}
    used = read_text_into_fam(trainer.fam_model, trainer.prompt, ids, block_size=8)
    assert all(p.grad is None for p in trainer.trainable_parameters)
    assert all(torch.equal(p, before[n]) for n, p in trainer.peft_model.named_parameters())
    with torch.no_grad():
        state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
        final = sequence_loss(trainer.fam_model, ids, torch.zeros(ids.shape), state).state
    assert all(not u.requires_grad and torch.allclose(u, f, atol=1e-6) for u, f in zip(used, final.fam, strict=True))


def test_a_passkey_step_can_start_from_a_memory_that_read_text(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, rsp=False, rpo=False), loaded=tiny_loaded(), data=KeyRecall())
    trainer.used_states = UsedStates(1.0, (2, 3), RandomText(), block_size=8)
    started = []
    original = initial_training_state

    def spy(fam_model, batch, prompt, passed):
        started.append(original(fam_model, batch, prompt, passed))
        return started[-1]

    monkeypatch.setattr("famviz.training.loop.initial_training_state", spy)
    replay = random.Random()
    replay.setstate(trainer.rng.getstate())
    trainer.data.draw(replay)  # the step draws its example first, then the used state's length and text
    replay.random()
    blocks = replay.randint(2, 3)
    text = torch.tensor([RandomText().window(replay, blocks * 8)])
    expected = read_text_into_fam(trainer.fam_model, trainer.prompt, text, block_size=8)
    record = trainer.train_step()
    assert record["used_blocks"] == blocks and not record["rsp"]
    assert not started[0].fam_fresh  # a used memory keeps its residual at the first update
    assert all(torch.equal(s, e) for s, e in zip(started[0].fam, expected, strict=True))


def test_used_states_off_draw_nothing_and_copy_steps_never_use_them():
    rng = random.Random(5)
    state = rng.getstate()
    assert UsedStates(0.0, (1, 16), None, 8).choose(rng, passkey_step=True) == 0 and rng.getstate() == state
    sometimes = UsedStates(0.5, (1, 16), RandomText(), 8)
    assert not any(sometimes.choose(rng, passkey_step=False) for _ in range(200))
    chosen = [sometimes.choose(rng, passkey_step=True) for _ in range(2000)]
    assert 0.45 < sum(1 for c in chosen if c) / 2000 < 0.55 and {c for c in chosen if c} == set(range(1, 17))


class WordTokenizer:
    """One id per word, in order of first appearance: enough to check which words a window holds."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_filler_windows_are_the_passkey_filler_from_a_random_token_of_its_cycle():
    from famviz.probes.passkey import FILLER

    tokenizer = WordTokenizer()
    filler = PasskeyFiller(tokenizer)
    words = FILLER.split()
    ids = tokenizer(FILLER)["input_ids"]
    starts = set()
    for seed in range(40):
        window = filler.window(random.Random(seed), 50)
        assert len(window) == 50
        repeated = ids * 4
        at = [start for start in range(len(words)) if repeated[start : start + 50] == window]
        assert at  # the filler, in order, repeated, from some token of its cycle
        starts.add(at[0])
    assert len(starts) > len(words) // 2  # phases vary
    assert len(filler.window(random.Random(0), 500)) == 500  # a longer window than first asked for


def test_a_mixed_used_memory_reads_filler_or_text_and_the_step_says_which(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, rsp=False, rpo=False), loaded=tiny_loaded(), data=KeyRecall())

    class Filler:
        def window(self, rng, length):
            return [3] * length

    mixed = UsedStates(1.0, (1, 2), RandomText(), 8, reads="mix", filler=Filler())
    rng = random.Random(0)
    reads = [mixed.make(trainer.fam_model, trainer.prompt, 1, rng)[1] for _ in range(40)]
    assert 10 < reads.count("filler") < 30 and set(reads) == {"filler", "text"}
    only_filler = UsedStates(1.0, (1, 2), None, 8, reads="filler", filler=Filler())  # needs no corpus
    fam, read = only_filler.make(trainer.fam_model, trainer.prompt, 2, random.Random(0))
    expected = read_text_into_fam(trainer.fam_model, trainer.prompt, torch.full((1, 16), 3), block_size=8)
    assert read == "filler" and all(torch.equal(f, e) for f, e in zip(fam, expected, strict=True))
    with pytest.raises(ValueError, match="text corpus"):
        UsedStates(0.5, (1, 2), None, 8, reads="mix", filler=Filler())
    trainer.used_states = mixed
    assert trainer.train_step()["used_reads"] in {"filler", "text"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(used_state_reads="noise"), "--used-state-reads must be one of"),
        (dict(used_state_prob=1.5), "--used-state-prob must be within"),
        (dict(used_state_prob=0.5, mode="bswa"), "needs a FAM"),
        (dict(used_state_blocks="8-2"), "--used-state-blocks"),
        (dict(eval_depth=2.0), "--eval-depth must be within"),
    ],
)
def test_used_state_and_eval_depth_options_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides).validate()


# -- checkpoints and resume ------------------------------------------------------------------------
def test_resume_continues_identically(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a", steps=4), loaded=tiny_loaded(), data=KeyRecall())
    straight.run(progress=False)
    # Interrupted during step 3, after its checkpoint at step 2: step 3 is lost and must be redone identically.
    interrupted = Trainer(tiny_config(tmp_path / "b", steps=4, eval_every=3), loaded=tiny_loaded(), data=KeyRecall())

    def interrupt():
        raise KeyboardInterrupt

    interrupted.evaluate = interrupt
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(progress=False)
    assert len((tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()) == 3
    resumed = Trainer(tiny_config(tmp_path / "b", steps=4), loaded=tiny_loaded(), data=KeyRecall())
    resumed.run(resume=True, progress=False)

    def losses(directory):
        return [json.loads(line)["loss"] for line in (directory / "run" / "train_log.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    from famviz.training.checkpoints import trainable_state

    a = trainable_state(straight.peft_model, straight.prompt)
    b = trainable_state(resumed.peft_model, resumed.prompt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.optimizer.state_dict()["state"].keys() == resumed.optimizer.state_dict()["state"].keys()


def test_resume_can_change_the_recipe(tmp_path):
    """A curriculum resumes a run with other data and switches (e.g. RSP off for the first stage, then on)."""
    import argparse
    from dataclasses import asdict

    from famviz.commands.train import add_train_options, config_from_args
    from famviz.training.config import TRAIN_CONFIG

    run = tmp_path / "run"
    run.mkdir()
    (run / TRAIN_CONFIG).write_text(json.dumps(asdict(tiny_config(tmp_path, rsp=False, passkey_tokens="260-420"))))
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    config, resumed = config_from_args(
        parser.parse_args(["--resume", str(run), "--rsp", "--passkey-tokens", "300-1300"])
    )
    assert resumed and config.rsp and config.passkey_tokens == "300-1300" and config.out == str(run)
    assert config.block_size == 8 and config.lr == 1e-2  # everything not given is the run's own
    config, _ = config_from_args(parser.parse_args(["--resume", str(run)]))
    assert not config.rsp and config.passkey_tokens == "260-420"


def test_run_writes_adapter_card_log_and_curve(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=3), loaded=tiny_loaded(), data=KeyRecall())
    out = trainer.run(progress=False)
    for name in (
        "famviz_adapter.json",
        "fam_prompt.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_card.json",
        "TRAINING_CARD.md",
        "train_log.jsonl",
        "loss_curve.html",
        "train_config.json",
        "recipe.toml",
    ):
        assert (out / name).is_file(), name
    card = json.loads((out / "training_card.json").read_text())
    from famviz.training.recipe import read_recipe

    assert read_recipe(out / "recipe.toml") == read_recipe_text(tmp_path, card["recipe"])  # the recipe as run
    assert read_recipe(out / "recipe.toml")["lora_rank"] == 4 and "```toml" in (out / "TRAINING_CARD.md").read_text()
    assert card["steps"] == 3 and card["lora"]["rank"] == 4 and card["rsp_prob"] == 0.8
    assert card["data_mixture"]["weights"]
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert card["final_loss_steps"] == 3 and card["final_loss_mean_last_50"] == pytest.approx(sum(losses) / 3)
    assert "Mean training loss over all 3 steps (the run has fewer than 50):" in (out / "TRAINING_CARD.md").read_text()


def test_the_card_says_over_how_many_steps_its_mean_loss_is():
    from famviz.io.adapters import card_markdown

    def line(card):
        return next(t for t in card_markdown(card).splitlines() if t.startswith("- Mean training loss"))

    assert line({"final_loss_steps": 50, "steps": 400, "final_loss_mean_last_50": 1.2}).endswith("last 50 steps: 1.2")
    assert "over its only step:" in line({"final_loss_steps": 1, "steps": 1, "final_loss_mean_last_50": 2.0})
    assert "over all 7 steps" in line({"steps": 7, "final_loss_mean_last_50": 2.0})  # a card without the count
    assert "the last 50 steps" in line({"steps": 171, "final_loss_mean_last_50": 2.0})


def test_the_progress_bar_labels_its_losses(tmp_path, capfd):
    trainer = Trainer(tiny_config(tmp_path, steps=3), loaded=tiny_loaded(), data=KeyRecall())
    capfd.readouterr()
    trainer.run(progress=True)
    err = capfd.readouterr().err
    assert "loss=" in err and "loss(avg3)=" in err and "tok/s=" in err, err


@pytest.mark.parametrize(
    ("decay", "expected"),
    [
        ("none", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 0.82, 0.64, 0.46, 0.28, 0.1]),
        ("cosine", [0.5, 1.0, 0.9140576, 0.6890576, 0.4109424, 0.1859424, 0.1]),
    ],
)
def test_learning_rate_warms_up_then_decays_to_the_final_fraction(tmp_path, decay, expected):
    config = tiny_config(tmp_path, steps=7, warmup_steps=2, lr_decay=decay, lr_final=0.1)
    assert [config.lr_scale(step) for step in range(7)] == pytest.approx(expected)
    trainer = Trainer(config, loaded=tiny_loaded(), data=KeyRecall())
    base = [group["lr"] for group in trainer.optimizer.param_groups]
    seen = []  # the rates each update is made with
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([group["lr"] for group in trainer.optimizer.param_groups])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    for _ in range(3):
        trainer.train_step()
    assert seen == [pytest.approx([lr * expected[i] for lr in base]) for i in range(3)]


def test_keep_best_writes_the_adapter_of_the_best_evaluation_and_resumes_keep_it(tmp_path):
    """Held-out scores (accuracy, then key log-prob) scripted per step: best/ holds the weights of step 3, a
    crash after it and a resume whose evaluations are worse leave it there, and a new held-out length
    (a curriculum's next stage) starts afresh."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    scores = {1: (0.5, -2.0), 2: (0.25, -0.5), 3: (0.5, -1.0), 4: (0.5, -3.0), 5: (0.25, 0.0), 6: (0.0, -9.0)}
    weights = {}

    def scripted(trainer, crash_at=None):
        def evaluate():
            if trainer.step == crash_at:
                raise KeyboardInterrupt
            lora = get_peft_model_state_dict(trainer.peft_model)
            weights[trainer.step] = (trainer.prompt.detach().clone(), {k: v.clone() for k, v in lora.items()})
            accuracy, logprob = scores[trainer.step]
            length = 64 if trainer.step == 6 else 32
            return {
                "step": trainer.step,
                "eval": {"length": length, "depth": 0.0, "trials": 4, "accuracy": accuracy, "key_logprob": logprob},
            }

        trainer.evaluate = evaluate
        return trainer

    def best_step():
        return json.loads((best / "training_card.json").read_text())["steps"]

    def assert_best_holds(step):
        prompt, lora = weights[step]
        assert torch.equal(load_file(str(best / "fam_prompt.safetensors"))["fam_prompt"], prompt)
        stored = load_file(str(best / "adapter_model.safetensors"))
        assert stored.keys() == lora.keys() and all(torch.equal(stored[k], lora[k]) for k in lora)

    config = tiny_config(tmp_path, steps=6, eval_every=1, checkpoint_every=2, keep_best=True)
    best = tmp_path / "run" / "best"
    with pytest.raises(KeyboardInterrupt):
        scripted(Trainer(config, loaded=tiny_loaded(), data=KeyRecall()), crash_at=4).run(progress=False)
    for name in ("famviz_adapter.json", "fam_prompt.safetensors", "adapter_model.safetensors", "training_card.json"):
        assert (best / name).is_file(), name
    assert json.loads((best / "train_config.json").read_text())["keep_best"]
    logged = [json.loads(line) for line in (best / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval" in r] == [1, 2, 3] and logged[-1]["kept_best"]
    card = json.loads((best / "training_card.json").read_text())
    assert card["steps"] == 3 and card["best_held_out"]["step"] == 3
    assert_best_holds(3)
    # The kept best was checkpointed at once (not at the next even step), so no resume redoes step 3 unflagged.
    assert torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)["step"] == 3

    scripted(Trainer(replace(config, steps=5), loaded=tiny_loaded(), data=KeyRecall())).run(resume=True, progress=False)
    assert best_step() == 3
    assert_best_holds(3)
    assert not torch.equal(weights[3][0], weights[5][0])  # the run's last weights are not the best
    final = json.loads((tmp_path / "run" / "training_card.json").read_text())
    assert final["steps"] == 5 and final["best_held_out"] == {"step": 3, **final["held_out_passkey_during_training"][2]}

    scripted(Trainer(config, loaded=tiny_loaded(), data=KeyRecall())).run(resume=True, progress=False)
    assert best_step() == 6  # 0% at the new length, but the first of its kind
    assert_best_holds(6)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"lr_decay": "sideways"}, "--lr-decay"),
        ({"lr_decay": "cosine", "lr_final": 1.5}, "--lr-final"),
        ({"keep_best": True, "eval_every": 0}, "--eval-every"),
    ],
)
def test_schedule_and_keep_best_options_are_checked(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(tmp_path, **overrides).validate()


# -- data ----------------------------------------------------------------------------------------------
def test_copy_example_repeats_an_earlier_segment_with_weight():
    class Corpus:
        tokenizer = staticmethod(lambda text, add_special_tokens=False: {"input_ids": [7, 8, 9]})

        def window(self, rng, length):
            return list(range(100, 100 + length))

    example = copy_example(Corpus(), random.Random(0), text_tokens=50, copy_len=10, copy_weight=0.1)
    text, marker, segment = example.ids[:50], example.ids[50:53], example.ids[53:]
    assert marker == [7, 8, 9] and len(segment) == 10
    start = text.index(segment[0])
    assert text[start : start + 10] == segment
    assert example.weights[53:] == [0.1] * 10 and not any(example.weights[:53])


def test_mixture_and_range_parsing():
    assert parse_mixture("passkey:3,copy:1") == {"passkey": 0.75, "copy": 0.25}
    assert parse_range("256-2048", "x") == (256, 2048)
    with pytest.raises(ConfigError):
        parse_mixture("passkey,poetry")
    with pytest.raises(ConfigError):
        parse_range("2048-256", "x")


def test_cli_train_refuses_bad_input(tmp_path, capfd):
    status, out, err = run_cli_in_process(["train"], capfd)
    assert_one_line_error(status, out, err, contains=("--out",))
    status, out, err = run_cli_in_process(["train", "--out", tmp_path / "r", "--data", "poetry"], capfd)
    assert_one_line_error(status, out, err, contains=("poetry",))
    status, out, err = run_cli_in_process(["train", "--resume", tmp_path / "nothing"], capfd)
    assert_one_line_error(status, out, err, contains=("resume",))


def _corpus_of_one_short_document(tmp_path):
    corpus = tmp_path / "short-corpus"
    corpus.mkdir()
    (corpus / "note.txt").write_text("Too short to train on.")
    return corpus


@pytest.mark.parametrize(
    ("corpus", "words"),
    [
        (lambda t: t / "missing", "does not exist"),  # found before the model loads
        (_corpus_of_one_short_document, "shorter than one training sequence"),  # found once the model is there
    ],
)
def test_a_run_that_cannot_start_prints_one_line_and_leaves_no_directory(tmp_path, capfd, caplog, corpus, words):
    import logging

    from helpers import save_tiny_llama_dir

    model_dir = save_tiny_llama_dir(tmp_path / "model")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="famviz"):
        status, stdout, err = run_cli_in_process(
            ["train", "--out", out, "--model", model_dir, "--corpus", corpus(tmp_path), "--data", "passkey,copy"],
            capfd,
        )
    assert_one_line_error(status, stdout, err, contains=(words,))
    assert not out.exists()
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("training fam:")]  # no config


def test_a_run_that_fails_in_its_first_step_leaves_no_directory_but_an_existing_one_stays(tmp_path, capfd, monkeypatch):
    from helpers import save_tiny_llama_dir

    from famviz.errors import FamvizError

    def fail(self):
        raise FamvizError("the first step failed")

    monkeypatch.setattr(Trainer, "train_step", fail)
    model_dir = save_tiny_llama_dir(tmp_path / "model")
    args = ["--model", model_dir, "--data", "passkey", "--passkey-tokens", "90-140", "--block-size", "64"]
    status, stdout, err = run_cli_in_process(["train", "--out", tmp_path / "run", *args], capfd)
    assert status == 2 and "famviz: error: the first step failed" in err
    assert not (tmp_path / "run").exists()
    kept = tmp_path / "mine"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("the user's own")
    status, stdout, err = run_cli_in_process(["train", "--out", kept, *args], capfd)
    assert status == 2 and (kept / "notes.txt").read_text() == "the user's own"  # not made by the run: kept


@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates_a_tiny_model(tmp_path, capfd):
    """End to end through the CLI on a tiny Llama with the real tokenizer: PassKey + copy data, resume, evaluate."""
    from helpers import save_tiny_llama_dir

    model_dir = save_tiny_llama_dir(tmp_path / "model")
    out = tmp_path / "run"
    common = ["--threads", "1", "--eval-every", "0"]
    status, stdout, err = run_cli_in_process(
        [
            "train",
            "--out",
            out,
            "--model",
            model_dir,
            "--block-size",
            "64",
            "--fam-len",
            "8",
            "--steps",
            "2",
            "--passkey-tokens",
            "90-140",
            "--copy-text-tokens",
            "100-140",
            "--copy-len",
            "32",
            "--data",
            "passkey,copy",
            "--checkpoint-every",
            "1",
            *common,
        ],
        capfd,
    )
    assert status == 0, err
    status, stdout, err = run_cli_in_process(["train", "--resume", out, "--steps", "3", *common], capfd)
    assert status == 0, err
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    card = json.loads((out / "training_card.json").read_text())
    assert card["steps"] == 3 and "resumed" in card["command"] and card["note"]
    status, stdout, err = run_cli_in_process(
        [
            "evaluate",
            out,
            "--model",
            model_dir,
            "--lengths",
            "120",
            "--trials",
            "1",
            "--threads",
            "1",
            "--long-tokens",
            "0",
            "--json",
            "--write-card",  # the card is written only when asked
        ],
        capfd,
    )
    assert status == 0, err
    evaluation = json.loads((out / "training_card.json").read_text())["evaluation"]["fam_mem0_block64"]
    assert evaluation == json.loads(stdout)  # the card holds what was printed
    assert [c["label"] for c in evaluation["passkey"]] == [
        "fam (mem 0)",
        "bswa (mem 0)",
        "full",
    ]  # the same keys for each mode
    assert all(c["trials"] == 1 for c in evaluation["passkey"])
    assert all(evaluation["in_window_nll"][k] > 0 for k in ("tuned", "untuned_same_mode", "untuned_full_attention"))

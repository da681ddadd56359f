"""PassKey probes (famviz.probes.passkey): generator, scoring, forking probes, sweeps; figures.

Fast tests use the bundled tokenizer (and a tiny random model with its vocabulary); the
integration tests at the end run the real bundled model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import bundled_tokenizer, run_cli_in_process, tiny_causal_lm

from famviz import FamConfig, FamModel, Stream, prepare_model
from famviz.probes import passkey as pk
from famviz.viz.passkey_figures import passkey_heatmap, retention_figure


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- the generator ---------------------------------------------------------------------------------------
def test_template_is_the_landmark_prompt(tokenizer):
    doc = pk.make_passkey_document(tokenizer, 400, depth=0.0, key=31337)
    lines = doc.text.split("\n")
    assert lines[0] == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there."
    )
    assert lines[1] == "The pass key is 31337. Remember it. 31337 is the pass key."  # depth 0: right after it
    assert lines[-1] == "What is the pass key? The pass key is"
    assert lines[2].startswith(
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    )
    assert doc.text.count("31337") == 2 and len(lines) == 4


@pytest.mark.parametrize("length", [200, 1000, 2000, 8000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_length_is_hit_in_model_tokens_and_the_key_sits_at_its_depth(tokenizer, length, depth):
    doc = pk.make_passkey_document(tokenizer, length, depth, seed=3)
    assert length - 4 <= doc.length <= length
    assert doc.token_ids == tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    start, end = doc.key_span
    assert tokenizer.decode(doc.token_ids[start:end]) == pk.key_sentence(doc.key)
    assert tokenizer.decode(doc.token_ids[doc.question_start :]) == "\n" + pk.QUESTION
    # Filler tokens before the key over all filler tokens is the depth (to within a sentence fragment).
    instruction = count(tokenizer, pk.INSTRUCTION + "\n")
    before, after = start - instruction, doc.question_start - end
    assert before / (before + after) == pytest.approx(depth, abs=8 / length + 0.01)


def test_depth_one_puts_the_key_right_before_the_question(tokenizer):
    doc = pk.make_passkey_document(tokenizer, 600, depth=1.0, key=7)
    assert doc.text.endswith("\n" + pk.key_sentence(7) + "\n" + pk.QUESTION)


def test_seeds_are_reproducible_and_keys_in_range(tokenizer):
    a = pk.make_passkey_document(tokenizer, 300, 0.5, seed=11)
    b = pk.make_passkey_document(tokenizer, 300, 0.5, seed=11)
    assert a.text == b.text and a.token_ids == b.token_ids
    keys = {pk.make_passkey_document(tokenizer, 300, 0.5, seed=s).key for s in range(20)}
    assert len(keys) > 15 and all(pk.KEY_MIN <= k <= pk.KEY_MAX for k in keys)
    docs = pk.trial_documents(tokenizer, 300, 0.5, 3, seed=5)
    assert [d.key for d in docs] == [d.key for d in pk.trial_documents(tokenizer, 300, 0.5, 3, seed=5)]
    assert [d.key for d in docs] != [d.key for d in pk.trial_documents(tokenizer, 300, 0.5, 3, seed=6)]


def test_answer_ids_are_the_models_continuation(tokenizer):
    doc = pk.make_passkey_document(tokenizer, 300, key=40213)
    assert tokenizer.decode(doc.answer_ids) == " 40213"
    whole = tokenizer(doc.text + " 40213", add_special_tokens=False)["input_ids"]
    assert whole == doc.token_ids + doc.answer_ids


def test_key_hidden_in_a_users_document(tokenizer, gpl_text):
    doc = pk.make_document_probe(tokenizer, gpl_text, depth=0.5, length=1500, key=999)
    assert 1496 <= doc.length <= 1500
    head, _, tail = doc.text.partition(pk.key_sentence(999))
    assert "GNU GENERAL PUBLIC LICENSE" in head and tail.endswith(pk.QUESTION)
    whole = pk.make_document_probe(tokenizer, "Short text only.", depth=1.0, key=5)  # shorter than asked: all of it
    assert whole.text == pk.INSTRUCTION + "\nShort text only.\n" + pk.key_sentence(5) + "\n" + pk.QUESTION


def test_bad_generator_input_is_refused(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        pk.make_passkey_document(tokenizer, 500, depth=1.5)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        pk.make_passkey_document(tokenizer, 20)
    with pytest.raises(pk.DocumentError):
        pk.make_document_probe(tokenizer, "  \n ", depth=0.5)


# -- scoring ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, ok",
    [
        ("12345.", True),
        (" 12345 is", True),
        (" 12345", True),
        ("The pass key is 12345. Remember", True),
        (" 1234", False),
        (" 123456", False),
        ("", False),
        (" a key that opens a door", False),
        (" 12,345", False),
        (" 54321 or 12345", False),
    ],
)
def test_first_integer_rule(answer, ok):
    assert pk.score_answer(answer, 12345) is ok


# -- probes on a tiny random model with the real tokenizer ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_with_vocab(tokenizer):
    return prepare_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer, name="tiny-vocab")


@pytest.mark.parametrize("mode", ["fam", "bswa", "full"])
def test_probing_never_changes_the_stream(tiny_with_vocab, tokenizer, mode):
    config = FamConfig(mode=mode, block_size=16, fam_len=4, mem_blocks=1)
    doc = pk.make_passkey_document(tokenizer, 120, depth=0.2, seed=1)

    def run(with_probes: bool):
        stream = Stream(tiny_with_vocab, config)
        probe = pk.RetentionProbe(doc.key, doc.key_span[1], every=2).attach(stream) if with_probes else None
        return stream.run(doc.haystack_ids), probe

    plain, _ = run(False)
    probed, probe = run(True)
    np.testing.assert_array_equal(plain.nll, probed.nll)
    for key in plain.trace.keys:
        np.testing.assert_array_equal(plain.trace.array(key), probed.trace.array(key))
    blocks = -(-len(doc.haystack_ids) // 16)
    key_block = (doc.key_span[1] - 1) // 16
    assert [p.blocks_since_key for p in probe.points] == list(range(0, blocks - key_block, 2))
    assert all(p.tokens >= doc.key_span[1] for p in probe.points)


def test_probe_answers_what_the_whole_prompt_answers(tiny_with_vocab, tokenizer):
    """A live probe after the haystack equals asking the full prompt from scratch."""
    config = FamConfig(mode="fam", block_size=16, fam_len=4, mem_blocks=0)
    fam = FamModel(tiny_with_vocab, config)
    doc = pk.make_passkey_document(tokenizer, 100, depth=0.0, seed=2)
    block_end = (len(doc.haystack_ids) // 16) * 16
    state = pk.advance(fam, fam.initial_state(), doc.haystack_ids[:block_end])
    live = pk.live_probe(fam, state, doc.key, pending=doc.haystack_ids[block_end:])
    whole = pk.ask(fam, doc)
    assert live.answer == whole.answer
    assert live.key_logprob == pytest.approx(whole.key_logprob, abs=1e-3)
    # The key's log-prob is the sum over its tokens of the teacher-forced log-softmax.
    ids = doc.token_ids + doc.answer_ids
    with torch.no_grad():
        state, logits = fam.initial_state(), []
        for s in range(0, len(ids), 16):
            out = fam.forward_block(torch.tensor([ids[s : s + 16]]), state)
            logits.append(fam.logits(out.hidden)[0].float())
            state = out.state
    logp = torch.log_softmax(torch.cat(logits), -1)
    n = doc.length
    expected = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(doc.answer_ids))
    assert whole.key_logprob == pytest.approx(expected, abs=1e-3)


def test_shared_prefix_is_run_once_and_gives_the_same_answers(tiny_with_vocab, tokenizer):
    config = FamConfig(mode="bswa", block_size=16, fam_len=0, mem_blocks=1)
    fam = FamModel(tiny_with_vocab, config)
    docs = pk.trial_documents(tokenizer, 150, 1.0, 3, seed=0)
    shared = pk.shared_prefix_blocks([d.haystack_ids for d in docs], 16)
    assert shared >= 96 and shared % 16 == 0
    cell = pk.run_cell(fam, docs, pk.ModeSpec("bswa", 1))
    assert [r.answer for r in cell.results] == [pk.ask(fam, d).answer for d in docs]
    assert cell.trials == 3 and 0 <= cell.accuracy <= 1


def test_the_sweep_yields_every_trial_then_each_cell_once(tiny_with_vocab, tokenizer):
    specs = [pk.ModeSpec("fam", 0), pk.ModeSpec("bswa", 1)]
    base = FamConfig(block_size=16, fam_len=4, mem_blocks=0)
    documents = pk.sweep_documents(tokenizer, [130, 150], [0.0, 1.0], 2, seed=5)
    steps = list(pk.iter_sweep(tiny_with_vocab, specs, documents, base))
    assert len(steps) == 2 * 4 * 2  # modes × cells × trials, each trial once
    done = [step.cell for step in steps if step.cell_done]
    assert [(c.label, c.length, c.depth) for c in done] == [
        (spec.label, n, d) for spec in specs for n in (130, 150) for d in (0.0, 1.0)
    ]
    assert [step.cell.trials for step in steps[:2]] == [1, 2]  # the running cell grows trial by trial
    collected = pk.sweep(tiny_with_vocab, specs, [130, 150], [0.0, 1.0], 2, seed=5, base=base)
    assert [c.summary() | {"seconds": 0} for c in collected] == [c.summary() | {"seconds": 0} for c in done]
    with pytest.raises(ValueError, match="trials"):
        pk.sweep_documents(tokenizer, [130], [0.0], 0, seed=0)


def test_a_fam_prompt_is_used_only_by_a_mode_with_a_fam(tiny_with_vocab):
    prompt = torch.randn(4, tiny_with_vocab.config.hidden_size)
    fam = FamModel(tiny_with_vocab, FamConfig(mode="fam", block_size=16, fam_len=4), fam_prompt=prompt)
    assert fam.fam_prompt is prompt
    for mode in ("bswa", "sink", "full"):
        config = pk.sweep_config(FamConfig(block_size=16, fam_len=4), pk.ModeSpec(mode, 1))
        assert FamModel(tiny_with_vocab, config, fam_prompt=prompt).fam_prompt is None


def test_bswa_without_memory_needs_only_its_last_block(tiny_with_vocab, tokenizer):
    fam = FamModel(tiny_with_vocab, FamConfig(mode="bswa", block_size=16, fam_len=0, mem_blocks=0))
    for doc in pk.trial_documents(tokenizer, 130, 0.5, 2, seed=3):
        short, whole = pk.ask(fam, doc), pk.ask(fam, doc, skip_unseen=False)
        assert short.answer == whole.answer and short.key_logprob == pytest.approx(whole.key_logprob, abs=1e-4)


def test_mode_specs_parse():
    assert pk.ModeSpec.parse("bswa:1", 3) == pk.ModeSpec("bswa", 1)
    assert pk.ModeSpec.parse("fam", 0) == pk.ModeSpec("fam", 0)
    assert pk.ModeSpec.parse("sink:0", 1) == pk.ModeSpec("sink", 0)
    assert pk.sweep_config(FamConfig(block_size=8, sink_tokens=6), pk.ModeSpec("sink", 0)).active_sink_tokens == 6
    for bad in ("gru", "fam:x", "bswa:-1"):
        with pytest.raises(ValueError):
            pk.ModeSpec.parse(bad, 0)


def test_sink_mode_answers_from_the_kept_first_tokens(tiny_with_vocab, tokenizer):
    """Unlike BSWA without memory, sink mode cannot skip to the last block: its window keeps the first tokens."""
    config = FamConfig(mode="sink", block_size=16, fam_len=0, mem_blocks=0, sink_tokens=4)
    fam = FamModel(tiny_with_vocab, config)
    assert not fam.blocks_independent
    bswa = FamModel(tiny_with_vocab, FamConfig(mode="bswa", block_size=16, fam_len=0, mem_blocks=0))
    doc = pk.trial_documents(tokenizer, 130, 0.5, 1, seed=3)[0]
    sink, no_sinks = pk.ask(fam, doc), pk.ask(bswa, doc)
    assert sink.key_logprob == pytest.approx(pk.ask(fam, doc, skip_unseen=False).key_logprob, abs=1e-5)
    assert sink.key_logprob != pytest.approx(no_sinks.key_logprob, abs=1e-4)


# -- figures ------------------------------------------------------------------------------------------------
def _cell(label_mode, mem, length, depth, accuracy):
    spec = pk.ModeSpec(label_mode, mem)
    return pk.CellResult(
        mode=spec.mode,
        mem_blocks=mem,
        label=spec.label,
        length=length,
        depth=depth,
        trials=10,
        accuracy=accuracy,
        mean_key_logprob=-1.0,
        seconds=1.0,
    )


def test_heatmap_has_one_panel_per_mode_on_a_fixed_scale():
    cells = [_cell("fam", 0, n, d, a) for n, d, a in [(1000, 0.0, 1.0), (2000, 0.0, 0.5), (1000, 1.0, 0.2)]]
    cells.append(_cell("full", 0, 1000, 0.0, 0.9))
    fig = passkey_heatmap(cells)
    assert len(fig.data) == 2
    fam = fig.data[0]
    z = np.asarray(fam.z, dtype=float)
    assert z.shape == (2, 2)  # depths × lengths
    assert z[0, 0] == 1.0 and z[0, 1] == 0.5 and z[1, 0] == 0.2 and np.isnan(z[1, 1])
    assert (fam.zmin, fam.zmax) == (0.0, 1.0)
    assert fig.layout.xaxis.title.text == "length (tokens)" and fig.layout.yaxis.title.text == "key depth"
    assert [a.text for a in fig.layout.annotations] == ["fam (mem 0)", "full"]


def test_retention_figure():
    points = [
        pk.RetentionPoint(
            block=3 + i,
            tokens=100 * i,
            blocks_since_key=i,
            correct=i < 2,
            predicted=7 if i < 2 else None,
            key_logprob=-float(i),
            seconds=0.1,
        )
        for i in range(4)
    ]
    fig = retention_figure(points, key=7)
    assert list(fig.data[0].x) == [0, 1, 2, 3] and list(fig.data[1].y) == [1.0, 1.0, 0.0, 0.0]
    assert "blocks since" in fig.layout.xaxis.title.text
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tick0 == 0  # whole-block ticks, never "0 1 1 2 2"
    many = [
        pk.RetentionPoint(
            block=i, tokens=i, blocks_since_key=i, correct=True, predicted=7, key_logprob=0.0, seconds=0.1
        )
        for i in range(95)
    ]
    assert retention_figure(many, key=7).layout.xaxis.dtick == 10
    assert retention_figure([]).layout.annotations[0].text.startswith("no probe")


def retention_points(logprobs: list[float]) -> list[pk.RetentionPoint]:
    return [
        pk.RetentionPoint(
            block=i, tokens=256 * i, blocks_since_key=i, correct=True, predicted=12345, key_logprob=v, seconds=0.1
        )
        for i, v in enumerate(logprobs)
    ]


def test_chance_of_a_random_key_counts_the_keys_of_its_length():
    assert [pk.keys_with_digits(d) for d in (1, 2, 3, 4, 5, 6)] == [9, 90, 900, 9000, 40001, 0]
    assert pk.chance_key_logprob(12345) == pytest.approx(-np.log(40001))
    assert pk.chance_key_logprob(7) == pytest.approx(-np.log(9))
    assert pk.chance_key_logprob() == pytest.approx(-np.log(50000))  # no key: any of them


def test_retention_log_p_is_drawn_from_chance_to_zero_whatever_the_data():
    """-0.003 to -0.007 over 6 blocks must look flat: the axis spans chance … 0, not the data."""
    fig = retention_figure(retention_points([-0.003 - 0.0008 * i for i in range(6)]), key=12345)
    low, high = fig.layout.yaxis.range
    chance = pk.chance_key_logprob(12345)
    assert low <= chance < -10 and 0 <= high < 0.5
    (line,) = [s for s in fig.layout.shapes if s.y0 == s.y1]
    assert line.y0 == pytest.approx(chance) and line.yref == "y"  # on the log p axis, not the yes/no one
    labels = [a.text for a in fig.layout.annotations]
    assert any("chance" in t and "5-digit" in t and "40,001" in t for t in labels), labels
    # a curve below chance stays on the plot
    below = retention_figure(retention_points([-1.0, -25.0]), key=12345)
    assert below.layout.yaxis.range[0] <= -25.0 and below.layout.yaxis.range[1] >= 0


# -- the CLI (fast: argument errors only) ------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "gru"], "unknown mode"),
        (["--lengths", "1k"], "--lengths"),
        (["--depths", "2"], "depths"),
        (["--trials", "0"], "--trials"),
        (["--figure", "/nonexistent/x.png"], "does not exist"),
        (["--figure", "/tmp/x.gif"], ".png"),
    ],
)
def test_passkey_cli_refuses_bad_arguments(capfd, args, message):
    status, out, err = run_cli_in_process(["passkey", *args], capfd)
    assert status == 2 and message in err and "Traceback" not in err


# -- integration: the real bundled model --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_full_attention_retrieves_the_key_at_1000_tokens(bundled_fast):
    cell = pk.sweep(
        bundled_fast, [pk.ModeSpec("full", 0)], [1000], [0.0], trials=10, seed=0, base=FamConfig(block_size=256)
    )[0]
    assert cell.accuracy >= 0.9, [r.answer for r in cell.results]
    assert cell.mean_key_logprob > -2.0


@pytest.mark.slow
@pytest.mark.integration
def test_bswa_without_memory_cannot_see_a_key_at_depth_zero(bundled_fast):
    """Block 256, no memory blocks, 2000 tokens: the question's block never sees the key."""
    cell = pk.sweep(
        bundled_fast,
        [pk.ModeSpec("bswa", 0)],
        [2000],
        [0.0],
        trials=5,
        seed=0,
        base=FamConfig(block_size=256),
        skip_unseen=False,
    )[0]  # every block really runs
    assert sum(r.correct for r in cell.results) <= 1, [r.answer for r in cell.results]


@pytest.mark.slow
@pytest.mark.integration
def test_the_shipped_adapter_carries_the_key_through_its_memory(bundled_fast):
    """The tuned adapter in assets/ (loaded as the app and CLI load it) holds far more of a depth-0 key after
    one FAM update than the untuned conversion; its card reports -4.9 against chance at about -11.5."""
    from pathlib import Path

    from famviz import load_model
    from famviz.io.adapters import apply_adapter

    directory = Path(__file__).resolve().parents[2] / "assets/adapters/smollm2-135m-fam64-block256-mem0"
    config = FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=0)
    tuned = load_model(dtype="auto")
    prompt = apply_adapter(directory, tuned, config)
    spec = [pk.ModeSpec("fam", 0)]
    with_memory = pk.sweep(tuned, spec, [512], [0.0], trials=4, seed=0, base=config, fam_prompt=prompt)[0]
    untuned = pk.sweep(bundled_fast, spec, [512], [0.0], trials=4, seed=0, base=config)[0]
    assert with_memory.mean_key_logprob > -8.0, with_memory.mean_key_logprob
    assert with_memory.mean_key_logprob > untuned.mean_key_logprob + 8.0, (
        with_memory.mean_key_logprob,
        untuned.mean_key_logprob,
    )


@pytest.mark.slow
@pytest.mark.integration
def test_the_default_adapter_retrieves_pass_keys_through_its_memory(bundled_fast):
    """The app's default adapter retrieves keys that only its FAM can hold (its card, 50 trials: 96% at 512,
    92% at 2,048, 64% at 4,096 and 50% at 8,192 tokens, the question ending a block; BSWA, which cannot see
    the key, 0%). Fixed trials at 512 tokens, greedy."""
    from famviz import load_model
    from famviz.io.adapters import SHIPPED_ADAPTER, apply_adapter

    config = FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=0)
    tuned = load_model(dtype="auto")
    prompt = apply_adapter(SHIPPED_ADAPTER, tuned, config)
    cell = pk.sweep(tuned, [pk.ModeSpec("fam", 0)], [512], [0.0], trials=10, seed=0, base=config, fam_prompt=prompt)[0]
    bswa = pk.sweep(bundled_fast, [pk.ModeSpec("bswa", 0)], [512], [0.0], trials=5, seed=0, base=config)[0]
    assert cell.accuracy >= 0.5 and cell.mean_key_logprob > -2.5, (cell.accuracy, cell.mean_key_logprob)
    assert bswa.accuracy == 0.0 and cell.mean_key_logprob > bswa.mean_key_logprob + 6.0


@pytest.mark.slow
@pytest.mark.integration
def test_the_retrieval_adapter_answers_from_its_fam_over_eight_blocks():
    """`-retrieval` (its card, 50 trials: 94% at 512, 96% at 2,048, 72% at 4,096, 62% at 8,192 tokens): fixed
    trials at 2,048 tokens, the question ending the eighth block, greedy."""
    from famviz import load_model
    from famviz.io.adapters import SHIPPED_ADAPTERS, apply_adapter

    config = FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=0)
    tuned = load_model(dtype="auto")
    prompt = apply_adapter(SHIPPED_ADAPTERS / "smollm2-135m-fam64-block256-mem0-retrieval", tuned, config)
    cell = pk.sweep(tuned, [pk.ModeSpec("fam", 0)], [2048], [0.0], trials=4, seed=0, base=config, fam_prompt=prompt)[0]
    assert cell.accuracy >= 0.75 and cell.mean_key_logprob > -1.5, (cell.accuracy, cell.mean_key_logprob)


@pytest.mark.slow
@pytest.mark.integration
def test_the_default_adapter_predicts_long_text_better_than_untuned_bswa(bundled_fast):
    """The app's default adapter (its card: GPL-3 NLL 3.035 against 3.323 for untuned BSWA over 7,658 tokens,
    lower in every quarter): over the first 2,048 held-out tokens its FAM stream predicts better than the
    untuned model with BSWA and no memory blocks. (Its own weights as BSWA do as well, 3.035: the gain is
    the weights', not the memory's.)"""
    from famviz import load_model
    from famviz.io.adapters import SHIPPED_ADAPTER, apply_adapter
    from famviz.training.evaluation import held_out_documents, long_document_eval

    config = FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=0)
    tuned = load_model(dtype="auto")
    prompt = apply_adapter(SHIPPED_ADAPTER, tuned, config)
    ids = held_out_documents(tuned.tokenizer, 2048)[0].ids  # GPL-3
    fam = long_document_eval(FamModel(tuned, config, fam_prompt=prompt), ids, norm_after=())
    bswa = long_document_eval(FamModel(bundled_fast, FamConfig(mode="bswa", block_size=256, mem_blocks=0)), ids)
    assert fam["nll"] < 0.97 * bswa["nll"], (fam["nll"], bswa["nll"])
    assert all(f < b for f, b in zip(fam["nll_quarters"], bswa["nll_quarters"], strict=True)), (fam, bswa)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_sweep_json_and_figure(tmp_path, capfd):
    out = tmp_path / "grid.html"
    status, stdout, err = run_cli_in_process(
        [
            "passkey",
            "--modes",
            "full,bswa:0",
            "--lengths",
            "300",
            "--depths",
            "0,1",
            "--trials",
            "2",
            "--block-size",
            "128",
            "--json",
            "--figure",
            str(out),
            "--dtype",
            "auto",
        ],
        capfd,
    )
    assert status == 0, err
    result = json.loads(stdout)
    assert [(r["mode"], r["depth"]) for r in result["results"]] == [
        ("full", 0.0),
        ("full", 1.0),
        ("bswa", 0.0),
        ("bswa", 1.0),
    ]
    assert {"mode", "length", "depth", "trials", "accuracy", "mean_key_logprob"} <= set(result["results"][0])
    assert result["results"][0]["accuracy"] == 1.0 and result["results"][3]["accuracy"] == 1.0
    assert result["config"]["trials"] == 2 and out.stat().st_size > 10_000
    # Seeded: the same command gives the same numbers.
    status, again, _ = run_cli_in_process(
        [
            "passkey",
            "--modes",
            "full",
            "--lengths",
            "300",
            "--depths",
            "0",
            "--trials",
            "2",
            "--block-size",
            "128",
            "--json",
            "--dtype",
            "auto",
        ],
        capfd,
    )
    assert json.loads(again)["results"][0]["mean_key_logprob"] == result["results"][0]["mean_key_logprob"]


@pytest.mark.slow
@pytest.mark.integration
def test_live_retention_curve_on_the_bundled_model(bundled_fast):
    """Full attention keeps the key in view: every probe after the key retrieves it."""
    fam = FamModel(bundled_fast, FamConfig(mode="full", block_size=128))
    doc = pk.make_passkey_document(bundled_fast.tokenizer, 600, depth=0.0, seed=4)
    points = pk.retention_curve(fam, doc, every=1)
    assert [p.blocks_since_key for p in points] == list(range(len(points))) and len(points) >= 4
    assert all(p.correct for p in points), [(p.predicted, doc.key) for p in points]


@pytest.mark.parametrize("block_size", [16, 64])
def test_speculative_answer_is_exactly_the_greedy_answer(tiny_with_vocab, tokenizer, block_size):
    """Answers decoded with the key as a draft equal plain greedy decoding, whether the model's
    answer agrees with the draft or not, also when question and draft cross a block boundary."""
    from famviz.core.decode import BlockCursor

    fam = FamModel(tiny_with_vocab, FamConfig(mode="fam", block_size=block_size, fam_len=4, mem_blocks=0))
    doc = pk.make_passkey_document(tokenizer, 90, depth=0.0, seed=9)
    cursor = BlockCursor(fam, fam.initial_state())
    cursor.extend(doc.haystack_ids)
    question = doc.token_ids[doc.question_start :]
    plain = cursor.fork()
    expected = plain.greedy(plain.extend(question)[-1], 10)
    model_answer = tokenizer.decode(expected)
    for draft in (expected[:4], expected[:2] + [17, 18, 19], [5, 6], expected + [7]):
        got = pk.answer_question(fam, cursor, question, key=1, answer_ids=draft)
        assert got.answer == model_answer, (draft, got.answer, model_answer)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_prints_a_retention_curve(tmp_path, capfd):
    out = tmp_path / "retention.svg"
    status, stdout, err = run_cli_in_process(
        [
            "passkey",
            "--retention",
            "--modes",
            "full",
            "--lengths",
            "400",
            "--depths",
            "0",
            "--block-size",
            "128",
            "--probe-every",
            "1",
            "--dtype",
            "auto",
            "--figure",
            str(out),
        ],
        capfd,
    )
    assert status == 0, err
    lines = [line for line in stdout.splitlines() if "blocks since key" in line]
    assert len(lines) >= 3 and all("retrieved" in line for line in lines), stdout
    assert out.read_text().lstrip().startswith("<svg")
    status, stdout, err = run_cli_in_process(
        [
            "passkey",
            "--modes",
            "full",
            "--lengths",
            "300",
            "--depths",
            "0",
            "--trials",
            "1",
            "--block-size",
            "128",
            "--dtype",
            "auto",
        ],
        capfd,
    )
    assert status == 0 and "accuracy" in stdout.splitlines()[0] and "100.0%" in stdout.splitlines()[1], stdout

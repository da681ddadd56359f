"""Long-document evaluation (NLL per quarter, FAM norm over blocks) on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_causal_lm

from famviz import FamConfig, prepare_model
from famviz.core.engine import Stream
from famviz.core.fam_model import FamModel
from famviz.errors import ConfigError
from famviz.training.evaluation import fam_norm, held_out_documents, long_document_eval, pydoc_text


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


# -- `famviz evaluate` ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    from helpers import write_random_lora_adapter

    return write_random_lora_adapter(tmp_path_factory.mktemp("evaluate"), fam_len=4, block_size=64)


def _document(tmp_path, sentences: int = 200):
    path = tmp_path / "held-out.txt"
    path.write_text(" ".join(f"Held-out sentence {i} tells the memory something new." for i in range(sentences)))
    return path


def test_evaluate_prints_tables_and_fills_the_card(tiny_adapter, tmp_path, capfd):
    import json

    from helpers import run_cli_in_process

    model_dir, adapter_dir = tiny_adapter
    args = [
        "evaluate",
        adapter_dir,
        "--model",
        model_dir,
        "--dtype",
        "float32",
        "--lengths",
        "150,300",
        "--trials",
        "2",
        "--modes",
        "fam,bswa,sink",
        "--document",
        _document(tmp_path),
        "--long-tokens",
        "1024",
        "--threads",
        "1",
        "--write-card",
    ]
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0, err
    assert "Long document held-out.txt (1,024 tokens)" in out and "evaluated ÷ untuned bswa" in out
    assert "tuned weights, BSWA" in out and "÷ same weights in bswa" in out  # the memory's own effect
    assert "fam (mem 0)" in out and "bswa (mem 0)" in out and "150@0" in out and "300@0" in out
    assert "sink (mem 0)" in out and "untuned attention sinks (StreamingLLM)" in out  # StreamingLLM beside FAM
    assert "evaluate 2/4 in-window loss" in err and "evaluate 4/4 PassKey" in err  # a progress bar per part
    assert f"results recorded in {adapter_dir / 'training_card.json'}" in err
    card = json.loads((adapter_dir / "training_card.json").read_text())
    result = card["evaluation"]["fam_mem0_block64"]
    assert result["adapter"] == str(adapter_dir) and result["label"].endswith("+ adapter adapter")
    assert [(c["label"], c["length"]) for c in result["passkey"]] == [
        ("fam (mem 0)", 150),
        ("fam (mem 0)", 300),
        ("bswa (mem 0)", 150),
        ("bswa (mem 0)", 300),
        ("sink (mem 0)", 150),
        ("sink (mem 0)", 300),
    ]
    row = result["long_documents"][0]
    assert row["untuned_sink"]["nll"] != row["untuned_bswa"]["nll"]
    assert row["tuned_vs_tuned_bswa"] == pytest.approx(row["tuned"]["nll"] / row["tuned_bswa"]["nll"])
    assert set(row["tuned"]["fam_norm_after_blocks"]) == {"0", "4", "64"} and len(row["tuned"]["nll_quarters"]) == 4
    assert card["stage_evaluations"][-1]["key"] == "fam_mem0_block64"
    assert "| mode |" in (adapter_dir / "TRAINING_CARD.md").read_text()


def interrupt_after_the_first_cell(monkeypatch) -> None:
    """PassKey sweeps stop (as at Ctrl-C) right after their first cell is done."""
    from famviz.probes import passkey

    real_iter_sweep = passkey.iter_sweep

    def interrupted_sweep(*args, **kwargs):
        for step in real_iter_sweep(*args, **kwargs):
            yield step
            if step.cell_done:
                raise KeyboardInterrupt

    monkeypatch.setattr(passkey, "iter_sweep", interrupted_sweep)


def test_evaluate_keeps_partial_results_when_interrupted(tiny_adapter, tmp_path, capfd, monkeypatch):
    import json

    from helpers import run_cli_in_process

    model_dir, _ = tiny_adapter
    interrupt_after_the_first_cell(monkeypatch)
    status, out, err = run_cli_in_process(
        [
            "evaluate",
            "--model",
            model_dir,
            "--dtype",
            "float32",
            "--lengths",
            "150,300",
            "--trials",
            "1",
            "--long-tokens",
            "0",
            "--json",
            "--block-size",
            "64",
            "--fam-len",
            "4",
        ],
        capfd,
    )
    assert status == 130
    result = json.loads(out)
    assert result["interrupted"] and len(result["passkey"]) == 1 and result["in_window_nll"]["tuned"] > 0
    assert result["adapter"] is None and result["label"].endswith("(untuned conversion)")


def test_evaluate_json_of_an_adapter_and_its_card_keep_what_an_interrupted_run_did(
    tiny_adapter, tmp_path, capfd, monkeypatch
):
    import json
    import shutil

    from helpers import run_cli_in_process

    model_dir, shared_adapter = tiny_adapter
    adapter_dir = shutil.copytree(shared_adapter, tmp_path / "adapter")  # this test's card only
    card_path = adapter_dir / "training_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}  # not only after the test above
    card.setdefault("evaluation", {})["fam_mem0_block64"] = {"sink_tokens": 4, "interrupted": True}  # an earlier run
    card_path.write_text(json.dumps(card))
    common = ["--model", model_dir, "--dtype", "float32", "--lengths", "150,300", "--trials", "1"]
    common += ["--modes", "fam,bswa,sink", "--document", str(_document(tmp_path)), "--threads", "1", "--json"]
    common += ["--sink-tokens", "0", "--write-card"]  # no sinks: the sink baselines must equal bswa
    figure = tmp_path / "grid.html"
    status, out, err = run_cli_in_process(
        ["evaluate", adapter_dir, *common, "--long-tokens", "1024", "--figure", figure], capfd
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["figure"] == str(figure) and "PassKey" in figure.read_text()  # the grid, one panel per mode
    assert {"adapter", "label", "config", "in_window_nll", "long_documents", "passkey", "seconds"} <= result.keys()
    assert "interrupted" not in result and len(result["passkey"]) == 6 and result["sink_tokens"] == 0
    by_mode = {(c["mode"], c["length"]): c["mean_key_logprob"] for c in result["passkey"]}
    assert all(by_mode["sink", n] == pytest.approx(by_mode["bswa", n]) for n in (150, 300))
    assert {"label", "length", "depth", "trials", "accuracy"} <= result["passkey"][0].keys()
    row = result["long_documents"][0]
    assert {"tuned", "tuned_bswa", "untuned_bswa", "untuned_sink", "untuned_full"} <= row.keys()
    assert len(row["tuned"]["nll_quarters"]) == 4 and set(row["tuned"]["fam_norm_after_blocks"]) == {"0", "4", "64"}
    assert row["untuned_sink"]["nll"] == pytest.approx(row["untuned_bswa"]["nll"])
    recorded = json.loads(card_path.read_text())["evaluation"]["fam_mem0_block64"]
    assert recorded["sink_tokens"] == 0 and "interrupted" not in recorded  # this run's values, 0 included

    interrupt_after_the_first_cell(monkeypatch)
    status, out, _ = run_cli_in_process(["evaluate", adapter_dir, *common, "--long-tokens", "0"], capfd)
    assert status == 130 and json.loads(out)["interrupted"]
    card = json.loads((adapter_dir / "training_card.json").read_text())
    latest = card["stage_evaluations"][-1]
    assert latest["interrupted"] and len(latest["passkey"]) == 1  # the cell finished before Ctrl-C is kept
    # the card's current figures: the interrupted run's finished cell, the complete run's long documents
    assert len(card["evaluation"][latest["key"]]["passkey"]) == 1
    assert card["evaluation"][latest["key"]]["long_documents"] == result["long_documents"]


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--threads", "0"], ("--threads", "at least 1")),
        (["--modes", "fam,bswa:65"], ("memory blocks", "64")),
        (["--norm-after-blocks", "0"], ("--norm-after-blocks",)),
        (["--lengths", "10"], ("lengths",)),
        (["--depths", "2"], ("depths",)),
        (["--trials", "0"], ("--trials",)),
        (["--long-tokens", "100"], ("--long-tokens",)),
        (["--modes", "fam,poetry"], ("poetry",)),
        (["--document", "/no/such/file.txt"], ("file.txt", "not found")),
        (["--block-size", "0"], ("block size",)),
        (["--sink-tokens", "9000"], ("sink tokens", "8,192")),
        (["--figure", "grid.gif"], ("--figure",)),
        (["--figure", "/no/such/folder/grid.png"], ("does not exist",)),
        (["--figure", "grid.png", "--skip-passkey"], ("--skip-passkey",)),
    ],
)
def test_evaluate_refuses_bad_arguments_with_one_line(tiny_adapter, bad, words, capfd):
    from helpers import assert_one_line_error, run_cli_in_process

    model_dir, _ = tiny_adapter
    status, out, err = run_cli_in_process(["evaluate", "--model", model_dir, "--dtype", "float32", *bad], capfd)
    assert status == 2
    assert_one_line_error(status, out, err, contains=words)


# -- sizes, progress, and the card left alone ------------------------------------------------------------------
def _evaluate_args(*argv):
    from famviz.cli import build_parser

    return build_parser().parse_args(["evaluate", *map(str, argv)])


def test_quick_sizes_everything_down_and_explicit_options_still_win(tiny_adapter, tmp_path):
    from helpers import write_random_lora_adapter

    from famviz.commands.evaluate import plan_evaluation
    from famviz.training.evaluation_plan import QUICK

    model_dir, adapter_dir = tiny_adapter
    full = plan_evaluation(_evaluate_args("--model", model_dir))
    assert full.lengths == [2048, 4096, 8192] and full.sizes.trials == 50 and full.norm_after == (4, 64)
    assert not full.quick and not full.write_card
    quick = plan_evaluation(_evaluate_args("--quick", "--model", model_dir))
    assert quick.quick and [s.label for s in quick.specs] == ["fam (mem 0)", "bswa (mem 0)"]
    assert quick.lengths == [512]  # the untuned conversion's block 256, no memory: two blocks
    assert (quick.sizes.trials, quick.sizes.long_tokens, quick.sizes.windows) == (5, 1024, 4)
    assert quick.norm_after == (4,) and quick.sizes.long_documents == 1
    assert plan_evaluation(_evaluate_args(adapter_dir, "--quick")).lengths == [128]  # the adapter's block 64
    _, with_memory = write_random_lora_adapter(tmp_path, fam_len=4, block_size=64, mem_blocks=1)
    assert plan_evaluation(_evaluate_args(with_memory, "--quick")).lengths == [192]  # past the memory block
    mine = plan_evaluation(
        _evaluate_args("--quick", "--model", model_dir, "--trials", "7", "--lengths", "300", "--modes", "fam")
    )
    assert mine.sizes.trials == 7 and mine.lengths == [300] and len(mine.specs) == 1
    assert mine.sizes.windows == QUICK.windows and mine.sizes.long_tokens == 1024  # the rest stays quick


def test_every_numeric_option_of_evaluate_states_its_limits():
    from famviz.cli import build_parser

    parser = build_parser()
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    numeric = [a for a in evaluate._actions if a.type is int or a.metavar == "LIST"]
    assert {a.dest for a in numeric} >= {"threads", "block_size", "trials", "long_tokens", "lengths", "seed"}
    for action in numeric:
        assert any(words in action.help for words in ("at least", "…", "any integer")), (action.dest, action.help)
    long_tokens = next(a for a in numeric if a.dest == "long_tokens")
    assert "0 (no long-document check) or at least 1,024" in long_tokens.help


def test_quick_evaluation_shows_each_part_with_its_own_bar_and_leaves_the_card_alone(tiny_adapter, tmp_path, capfd):
    import json
    import shutil

    from helpers import run_cli_in_process

    model_dir, shared_adapter = tiny_adapter
    adapter_dir = shutil.copytree(shared_adapter, tmp_path / "adapter")
    card_files = {name: (adapter_dir / name).read_bytes() for name in ("training_card.json", "TRAINING_CARD.md")}
    status, out, err = run_cli_in_process(
        ["evaluate", adapter_dir, "--model", model_dir, "--quick", "--dtype", "float32", "--threads", "1", "--json"],
        capfd,
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["quick"] and result["in_window_nll"]["windows"] == 4
    assert [(c["mode"], c["length"], c["trials"]) for c in result["passkey"]] == [("fam", 128, 5), ("bswa", 128, 5)]
    (document,) = result["long_documents"]
    assert document["document"] == "GPL-3" and document["tokens"] == 1024
    assert set(document["tuned"]["fam_norm_after_blocks"]) == {"0", "4"}
    parts = [
        "evaluate 1/4 loading: the model and a copy with the adapter",
        "evaluate 2/4 in-window loss: 4 windows × 3 models",
        "evaluate 3/4 long documents: 1 document × 5 streams",
        "evaluate 4/4 PassKey: 2 modes × 1 length × 1 depth × 5 keys",
    ]
    shown = err.replace("\r", "\n").splitlines()
    for part in parts:
        last = [line for line in shown if line.startswith(part)][-1]
        assert "100%" in last, last  # each bar counts its own part to the end, no more, no less
    # the adapter's card is not touched, and the output says so
    assert all((adapter_dir / name).read_bytes() == data for name, data in card_files.items())
    assert "training card is unchanged (--write-card records them)" in err


def test_write_card_needs_an_adapter(tiny_adapter, capfd):
    from helpers import assert_one_line_error, run_cli_in_process

    model_dir, _ = tiny_adapter
    status, out, err = run_cli_in_process(["evaluate", "--model", model_dir, "--write-card"], capfd)
    assert_one_line_error(status, out, err, contains=("--write-card", "ADAPTER_DIR"))


def test_the_long_document_progress_counts_every_streamed_token(tiny):
    from famviz.training.evaluation import HeldOutDocument, comparison_tokens, long_document_comparison

    config = FamConfig("fam", 8, 4, 0)
    documents = [HeldOutDocument("a", list(range(1, 41))), HeldOutDocument("b", list(range(1, 17)))]
    counted = []
    rows = long_document_comparison(tiny, tiny, config, None, documents, norm_after=(3, 7), on_tokens=counted.append)
    # fam streams both documents on to block 7 (56 tokens); bswa, sink and full read each document once
    assert sum(counted) == comparison_tokens(config, False, documents, (3, 7)) == 2 * 56 + 3 * (40 + 16)
    assert set(rows[1]["tuned"]["fam_norm_after_blocks"]) == {"0", "3", "7"}

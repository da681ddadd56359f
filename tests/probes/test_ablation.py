"""FAM ablation and patching (famviz.probes.ablation) on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import bundled_tokenizer, tiny_causal_lm

from famviz import FamConfig, FamModel, prepare_model
from famviz.errors import ConfigError
from famviz.probes import ablation as ab
from famviz.probes import passkey as pk

BLOCK = 32


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def fam(tokenizer):
    loaded = prepare_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer, name="tiny-vocab")
    return FamModel(loaded, FamConfig(mode="fam", block_size=BLOCK, fam_len=4, mem_blocks=0))


@pytest.fixture(scope="module")
def cases(tokenizer):
    return ab.passkey_cases(tokenizer, BLOCK, 150, 0.0, 2, seed=1)


def test_corrupted_prompts_differ_only_in_the_key(cases, tokenizer):
    for clean, corrupted in cases:
        assert len(clean.prompt) == len(corrupted.prompt) and clean.split == corrupted.split
        differ = [i for i, (a, b) in enumerate(zip(clean.prompt, corrupted.prompt, strict=True)) if a != b]
        assert differ and max(differ) < clean.split  # depth 0: the key lies in the blocks before the question
        assert clean.target != corrupted.target


def test_no_intervention_equals_the_plain_run(fam, tokenizer):
    document = pk.trial_documents(tokenizer, 150, 0.0, 1, seed=4)[0]
    case = ab.passkey_case(document, BLOCK)
    trial = ab.prepare_trial(fam, case, None)
    assert trial.values["clean"] == pytest.approx(pk.ask(fam, document).key_logprob, abs=1e-4)
    # Replacing a layer's FAM by itself, at any block, changes nothing.
    for block in (1, case.blocks(BLOCK)):
        state = ab.with_layer_fam(trial.clean_states[block], 1, trial.clean_states[block].fam)
        state = ab.continue_to_question(fam, state, case, block)
        assert ab.target_logprob(fam, state, case) == pytest.approx(trial.values["clean"], abs=1e-4)


def test_ablating_every_layer_equals_streaming_from_the_initial_fam(fam, cases):
    clean, _ = cases[0]
    trial = ab.prepare_trial(fam, clean, None)
    for block in (1, 3):
        restarted = replace(fam.initial_state(), position=block * BLOCK)
        expected = ab.target_logprob(fam, ab.continue_to_question(fam, restarted, clean, block), clean)
        got = ab.intervened_logprob(fam, trial, "ablate", ab.ALL_LAYERS, block)
        assert got == pytest.approx(expected, abs=1e-4)
    assert trial.values["ablated"] == pytest.approx(
        ab.target_logprob(fam, replace(fam.initial_state(), position=clean.split), clean), abs=1e-4
    )


def test_patching_with_the_same_prompt_changes_nothing(fam, cases):
    clean, _ = cases[0]
    result = ab.run_interventions(fam, [(clean, clean)], "patch", blocks=[1, clean.blocks(BLOCK)], head_layer=0)
    np.testing.assert_allclose(result.delta, 0, atol=1e-4)
    np.testing.assert_allclose(result.head_delta, 0, atol=1e-4)
    result = ab.run_interventions(fam, [(clean, clean)], "write-time")
    np.testing.assert_allclose(result.delta, 0, atol=1e-4)


def test_interventions_fill_a_layer_by_block_grid(fam, cases):
    updates = []
    result = ab.run_interventions(
        fam, cases, "write-time", layers=[0, 1], on_update=lambda r: updates.append(r.delta.copy())
    )
    n_blocks = cases[0][0].blocks(BLOCK)
    assert result.layers == [0, 1, ab.ALL_LAYERS] and result.blocks == list(range(1, n_blocks + 1))
    assert result.delta.shape == (3, n_blocks) and np.isfinite(result.delta).all()
    assert np.isnan(updates[0]).sum() == 3 * n_blocks - 1  # filled one cell at a time, last block first
    assert result.trials == 2 and set(result.values) == {"clean", "ablated", "corrupted"}
    # Patching every layer's clean FAM into the corrupted run just before the question restores the clean value.
    last = result.delta[-1, -1] + result.values["corrupted"]
    assert last == pytest.approx(result.values["clean"], abs=1e-4)
    # Patching the clean FAM after the last block into the corrupted run is the patch method's opposite.
    patch = ab.run_interventions(fam, cases, "patch", layers=[0, 1])
    assert patch.delta.shape == (3, 1) and patch.blocks == [n_blocks]
    json.dumps(patch.to_dict())


def test_patching_one_layer_changes_that_layer_only_and_moves_the_key(fam, cases):
    clean, corrupted = cases[0]
    trial = ab.prepare_trial(fam, clean, corrupted)
    block = clean.blocks(BLOCK)
    patched = ab.with_layer_fam(trial.clean_states[block], 1, trial.corrupted_states[block].fam)
    assert patched.fam[1] is trial.corrupted_states[block].fam[1]
    assert all(patched.fam[i] is trial.clean_states[block].fam[i] for i in range(len(patched.fam)) if i != 1)
    result = ab.run_interventions(fam, [(clean, corrupted)], "patch", layers=[0, 1])
    assert np.abs(result.delta).max() > 1e-3  # another key in the memory changes log p(key)
    # patching every layer into the clean run before the question gives the corrupted run's value
    assert result.delta[-1, 0] + result.values["clean"] == pytest.approx(result.values["corrupted"], abs=1e-4)


def test_head_groups_of_a_layer(fam, cases):
    result = ab.run_interventions(fam, cases[:1], "ablate", layers=[], head_layer=1)
    assert result.head_delta.shape == (fam.n_kv_heads,) and np.isfinite(result.head_delta).all()
    assert result.layers == [ab.ALL_LAYERS]


def test_any_text_and_target(fam, tokenizer):
    text = "The secret word is banana. " + "Filler text goes on and on. " * 20 + "The secret word is"
    case = ab.text_case(tokenizer, text, " banana", BLOCK)
    assert tokenizer.decode(case.target) == " banana" and case.split % BLOCK == 0 and case.split < len(case.prompt)
    result = ab.run_interventions(fam, [(case, None)], "ablate", layers=[0])
    assert np.isfinite(result.delta).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope"), "--method"),
        (dict(method="patch", pairs=[(0, None)]), "corrupted"),
        (dict(blocks=[0]), "blocks must be"),
        (dict(layers=[99]), "layers must be"),
        (dict(head_layer=-1), "--head-layer"),
    ],
)
def test_bad_arguments_get_a_clear_message(fam, cases, kwargs, message):
    method = kwargs.pop("method", "ablate")
    pairs = kwargs.pop("pairs", None)
    pairs = [(cases[0][0], None)] if pairs is not None else cases
    with pytest.raises(ConfigError, match=message):
        ab.run_interventions(fam, pairs, method, **kwargs)


def test_models_without_fam_are_refused(fam, cases):
    bswa = FamModel(fam.loaded, FamConfig(mode="bswa", block_size=BLOCK, fam_len=0, mem_blocks=0))
    with pytest.raises(ConfigError, match="fam mode"):
        ab.run_interventions(bswa, cases, "ablate")


# -- the command ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from helpers import save_tiny_llama_dir

    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def test_cli_prints_one_json_object_and_writes_the_figure(tiny_model_dir, tmp_path, capfd):
    from helpers import run_cli_in_process

    figure = tmp_path / "ablate.html"
    status, out, err = run_cli_in_process(
        [
            "ablate",
            "--model",
            tiny_model_dir,
            "--method",
            "write-time",
            "--length",
            200,
            "--trials",
            2,
            "--block-size",
            64,
            "--fam-len",
            4,
            "--layers",
            "0,1",
            "--head-layer",
            1,
            "--json",
            "--figure",
            figure,
            "--dtype",
            "float32",
        ],
        capfd,
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["method"] == "write-time" and result["reference"] == "corrupted" and result["trials"] == 2
    assert result["layers"] == [0, 1, "all"] and result["blocks"] == [1, 2]
    assert len(result["delta_logprob"]) == 3 and all(len(row) == 2 for row in result["delta_logprob"])
    assert len(result["head_group_delta_logprob"]) == 2 and set(result["logprob"]) == {"clean", "ablated", "corrupted"}
    assert result["config"]["mode"] == "fam" and result["config"]["length"] == 200
    assert figure.stat().st_size > 10_000 and "Δ log p" in figure.read_text()


def test_cli_text_output_names_the_model_and_adapter(tiny_model_dir, capfd):
    from helpers import run_cli_in_process

    argv = ["ablate", "--model", tiny_model_dir, "--length", 200, "--trials", 1, "--block-size", 64, "--fam-len", 4]
    status, out, err = run_cli_in_process([*argv, "--layers", "0", "--dtype", "float32"], capfd)
    assert status == 0, err
    first = out.splitlines()[0]
    assert first.startswith("ablate: ") and str(tiny_model_dir) in first and "untuned" in first, first
    assert "block 64, FAM 4" in first


def test_cli_takes_the_adapters_trained_geometry_for_what_is_left_out(tmp_path, capfd):
    from helpers import run_cli_in_process, write_random_lora_adapter

    model_dir, adapter_dir = write_random_lora_adapter(tmp_path, fam_len=4, block_size=64)
    argv = ["ablate", "--model", model_dir, "--adapter", adapter_dir, "--length", 200, "--trials", 1, "--json"]
    status, out, err = run_cli_in_process([*argv, "--layers", "0", "--dtype", "float32"], capfd)
    assert status == 0, err
    config = json.loads(out)["config"]
    assert (config["block_size"], config["fam_len"], config["mem_blocks"]) == (64, 4, 0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "sideways"], "--method"),
        (["--depth", "2"], "--depth"),
        (["--text", "x.txt"], "--target"),
        (["--blocks", "0"], "blocks must be"),
        (["--layers", "a"], "--layers"),
        (["--mode-x"], "unrecognized"),
        (["--length", "20"], "shorter than the prompt"),
        (["--backend", "flash"], "not available"),  # flash-attn needs CUDA: ablate honours --backend
    ],
)
def test_cli_refuses_bad_arguments_in_one_line(tiny_model_dir, capfd, argv, message):
    from helpers import run_cli_in_process

    status, out, err = run_cli_in_process(
        [
            "ablate",
            "--model",
            tiny_model_dir,
            "--length",
            200,
            "--block-size",
            64,
            "--fam-len",
            4,
            "--trials",
            1,
            *argv,
        ],
        capfd,
    )
    assert status == 2 and message in err and "Traceback" not in err

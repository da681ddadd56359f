"""Training recipes as files: read, checked, overridden by options, written as run; the shipped ones repeat
their adapters' commands."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli_in_process

from famviz.errors import ConfigError
from famviz.training.config import TrainConfig
from famviz.training.recipe import NOT_IN_RECIPES, read_recipe, recipe_text

RECIPES = Path(__file__).resolve().parents[2] / "assets" / "recipes"
ADAPTERS = Path(__file__).resolve().parents[2] / "assets" / "adapters"


def train_config(argv: list[str]) -> TrainConfig:
    from famviz.cli import build_parser
    from famviz.commands.train import config_from_args

    args = build_parser().parse_args(["train", *argv])
    args.argv = ["train", *argv]  # as famviz.cli.main records it
    config, _ = config_from_args(args)
    return config


def settings(config: TrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPES}


def test_a_recipe_written_is_read_back_as_the_same_settings(tmp_path):
    config = TrainConfig(out="x", lr=3e-5, prompt_lr=None, corpus=["a dir", 'b "quoted".jsonl'], rsp=False, steps=7)
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_text(config, "a comment\nover two lines"))
    assert path.read_text().startswith("# a comment\n# over two lines\n")
    assert TrainConfig(out="x", **read_recipe(path)) == config


def test_options_given_override_the_recipe_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('lr = 1e-4\nsteps = 50\npasskey-tokens = "300-900"\nrsp = false\n')
    config = train_config(["--recipe", str(path), "--out", str(tmp_path / "run"), "--steps", "9"])
    assert (config.lr, config.steps, config.passkey_tokens, config.rsp) == (1e-4, 9, "300-900", False)
    assert config.block_size == TrainConfig(out="").block_size and "--recipe" in config.command


@pytest.mark.parametrize(
    "text, words",
    [
        ("learning_rate = 1e-4\n", ("unknown setting 'learning_rate'",)),
        ("stpes = 3\n", ("did you mean 'steps'",)),
        ('steps = "ten"\n', ("steps must be int",)),
        ("steps = 2.5\n", ("steps must be int",)),
        ("rsp = 1\n", ("rsp must be bool",)),
        ("lr = true\n", ("lr must be float",)),
        ('out = "elsewhere"\n', ("chosen per run", "--out")),
        ("lr = \n", ("not valid TOML",)),
        ("corpus = [1, 2]\n", ("corpus must be a list of paths",)),
    ],
)
def test_a_bad_recipe_is_one_line_naming_what_is_wrong(tmp_path, capfd, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        read_recipe(path)
    status, out, err = run_cli_in_process(["train", "--recipe", str(path), "--out", str(tmp_path / "run")], capfd)
    assert_one_line_error(status, out, err, contains=words)


def test_a_missing_or_binary_recipe_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_recipe(tmp_path / "none.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00lr")
    with pytest.raises(ConfigError, match="cannot read"):
        read_recipe(binary)


def test_print_recipe_shows_every_setting_and_writes_nothing(tmp_path, capfd):
    status, out, err = run_cli_in_process(["train", "--print-recipe", "--lr", "2e-4"], capfd)
    assert status == 0, err
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    expected = {k: v for k, v in settings(train_config(["--print-recipe", "--lr", "2e-4"])).items() if v is not None}
    assert read_recipe(printed) == expected and expected["lr"] == 2e-4
    assert not list(tmp_path.glob("run*"))


@pytest.mark.parametrize("adapter", sorted(p.name for p in ADAPTERS.iterdir()), ids=str)
def test_every_shipped_adapter_has_a_recipe_that_repeats_its_command(adapter):
    """The recipe file gives the same settings as the first command on the adapter's training card."""
    card = json.loads((ADAPTERS / adapter / "training_card.json").read_text())
    argv = shlex.split(card["command"].split("  (resumed: ")[0])[4:]  # after "python -m famviz train"
    out = argv.index("--out")
    from_command = settings(train_config(argv[:out] + ["--print-recipe"] + argv[out + 2 :]))
    from_recipe = settings(train_config(["--recipe", str(RECIPES / f"{adapter}.toml"), "--print-recipe"]))
    assert from_recipe == from_command

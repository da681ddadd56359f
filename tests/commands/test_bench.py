"""The benchmark command: figures, table and JSON (tiny random model; the real run is slow)."""

from __future__ import annotations

import json
import math

import pytest

from famviz.bench import TARGETS, BenchSizes, alternate, run_bench
from famviz.commands.bench import format_table

TINY = BenchSizes(
    compare_tokens=64,
    small_tokens=32,
    growth_factor=4,
    matmul_size=64,
    repeats=2,
    block_size=8,
    fam_len=4,
    mem_blocks=1,
)


@pytest.fixture(scope="module")
def tiny_figures(tiny_llama):
    return run_bench(tiny_llama, TINY)


def test_every_target_has_a_figure(tiny_figures):
    for name in TARGETS:
        assert name in tiny_figures and name in tiny_figures["checks"]
    for name in ("fam_vs_full", "mfu", "trace_on_vs_off", "fam_vs_bswa", "growth", "memory_growth"):
        value = tiny_figures[name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, name
        assert tiny_figures["checks"][name] in (True, False)
    # the tiny model has no tokenizer: the probe is reported as missing, not invented
    assert tiny_figures["probe_vs_block"] is None and "tokenizer" in tiny_figures["probe_note"]
    assert tiny_figures["checks"]["probe_vs_block"] is None


def test_figures_are_consistent(tiny_figures):
    f = tiny_figures
    assert f["fam_vs_full"] == pytest.approx(f["fam_tokens_per_s"] / f["full_forward_tokens_per_s"])
    assert f["mfu"] == pytest.approx(2 * f["parameters"] * f["fam_tokens_per_s"] / (f["matmul_gflops"] * 1e9))
    assert f["trace_on_vs_off"] == pytest.approx(f["trace_on_s"] / f["trace_off_s"])
    assert f["growth"] == pytest.approx(f["large_s"] / (4 * f["small_s"]))
    for name in ("fam_vs_full_cpu", "trace_on_vs_off_cpu", "fam_vs_bswa_cpu", "growth_cpu", "growth_per_block"):
        assert math.isfinite(f[name]) and f[name] > 0, name
    assert f["sizes"]["small_tokens"] == 32 and f["device"] == "cpu"


def test_json_and_table(tiny_figures):
    assert json.loads(json.dumps(tiny_figures)) == tiny_figures
    table = format_table(tiny_figures)
    assert table.startswith("| figure | measured | in CPU time | target | met |")
    assert table.count("\n| ") == len(TARGETS)  # one row per figure
    assert "GFLOP/s" in table and "n/a" in table  # no probe on the tiny model


def test_alternate_takes_turns_and_reports_medians():
    order = []
    wall, cpu = alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, _cpu())
    assert order == ["a", "b"] * 3 and set(wall) == set(cpu) == {"a", "b"}
    assert all(seconds >= 0 for seconds in [*wall.values(), *cpu.values()])


def _cpu():
    import torch

    return torch.device("cpu")


def test_cli_parses_bench_options():
    from famviz.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--json", "--device", "cpu"])
    assert args.quick and args.json and args.device == "cpu" and args.handler.__module__ == "famviz.commands.bench"
    assert not args.train
    args = build_parser().parse_args(["bench", "--train", "--recipe", "DIR"])
    assert args.train and args.recipe == "DIR"


@pytest.mark.slow
def test_quick_bench_on_the_bundled_model(bundled_fast):
    """The quick figures on the real model (minutes): every figure, the live probe included."""
    figures = run_bench(
        bundled_fast, BenchSizes(compare_tokens=512, small_tokens=512, growth_factor=2, matmul_size=512, repeats=1)
    )
    for name in TARGETS:
        assert figures[name] is not None or name == "probe_vs_block", name
    assert figures["probe_s"] > 0 and figures["probe_vs_block"] > 0


def test_train_bench_reads_the_recipe_and_compares_in_one_run(tmp_path):
    """``bench --train``: the recipe's geometry and data, training and streaming measured in turns."""
    from dataclasses import asdict

    from helpers import save_tiny_llama_dir

    from famviz.bench import TrainBenchSizes, run_train_bench
    from famviz.commands.bench import format_train_table
    from famviz.training.config import TRAIN_CONFIG, TrainConfig

    model_dir = save_tiny_llama_dir(tmp_path / "tiny")
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    config = TrainConfig(
        out="DIR",
        block_size=16,
        fam_len=4,
        mem_blocks=0,
        lora_rank=2,
        data="passkey:1",
        passkey_tokens="60-90",
        readout_weight=1.0,
        checkpoint_layers=False,
        eval_every=25,  # the run's own options, which the bench must not need (no evaluations, no best/)
        keep_best=True,
    )
    (recipe / TRAIN_CONFIG).write_text(json.dumps(asdict(config)))
    figures = run_train_bench(
        str(model_dir),
        device="cpu",
        dtype="float32",
        sizes=TrainBenchSizes(steps=2, stream_tokens=64, repeats=2),
        recipe_dir=recipe,
    )
    assert figures["fam"] == {"mode": "fam", "block_size": 16, "fam_len": 4, "mem_blocks": 0}
    assert figures["lora_rank"] == 2 and figures["readout_weight"] == 1.0 and figures["recipe"] == str(recipe)
    assert len(figures["turns"]["train_tokens_per_s"]) == 2
    assert figures["train_vs_stream"] == pytest.approx(figures["train_tokens_per_s"] / figures["stream_tokens_per_s"])
    assert figures["met"] == (figures["train_vs_stream"] >= 0.4)
    json.dumps(figures)
    table = format_train_table(figures)
    assert "training tok/s ÷ fam inference stream tok/s" in table and "block 16, FAM 4" in table

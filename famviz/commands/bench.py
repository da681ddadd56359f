"""``famviz bench``: speed and memory figures of streaming (or training against streaming), measured side by
side in one run (``famviz.bench``), printed as a table with their targets or as one JSON object."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from famviz.commands.options import MODEL_HELP, add_device_options, add_json_option

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("famviz")

LABELS = {
    "fam_vs_full": "fam tok/s ÷ model's own full forward",
    "mfu": "model-FLOP utilisation",
    "memory_growth": "peak memory large ÷ small document",
    "trace_on_vs_off": "trace on ÷ trace off (time)",
    "fam_vs_bswa": "fam ÷ bswa (time)",
    "probe_vs_block": "live PassKey probe ÷ one block",
    "growth": "time large ÷ (16 × time small)",
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="speed and memory figures of streaming, measured side by side")
    parser.add_argument("--quick", action="store_true", help="smaller documents (a few minutes)")
    add_json_option(parser)
    add_device_options(parser, dtype_help="default auto: bfloat16 where the CPU or GPU computes it, else float32")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument(
        "--train",
        action="store_true",
        help="instead: training tok/s of the shipped recipe against the fam inference stream's tok/s",
    )
    parser.add_argument(
        "--recipe",
        metavar="ADAPTER_DIR",
        default=None,
        help="with --train: the run whose train_config.json is the recipe (default: the shipped adapter)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from famviz import bench

    def progress(message: str) -> None:
        log.warning("bench: %s", message)

    if args.train:
        sizes = bench.TRAIN_QUICK if args.quick else bench.TrainBenchSizes()
        figures = bench.run_train_bench(
            args.model, args.device, args.dtype, sizes, recipe_dir=args.recipe, progress=progress
        )
        print(json.dumps(figures) if args.json else format_train_table(figures))
        return 0
    from famviz.io.models import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    figures = bench.run_bench(loaded, bench.QUICK if args.quick else bench.FULL, progress=progress)
    print(json.dumps(figures) if args.json else format_table(figures))
    return 0


def format_table(figures: dict) -> str:
    """The figures as a Markdown table (figure, measured, target, met) plus the raw timings."""
    lines = ["| figure | measured | in CPU time | target | met |", "|---|---|---|---|---|"]
    from famviz.bench import TARGETS

    for name, (comparison, target) in TARGETS.items():
        value = figures.get(name)
        shown = "n/a" if value is None else (f"{value:.1%}" if name == "mfu" else f"{value:.2f}")
        goal = f"{comparison} {target:.0%}" if name == "mfu" else f"{comparison} {target:.2f}"
        met = {True: "yes", False: "no", None: "-"}[figures["checks"].get(name)]
        cpu = figures.get(f"{name}_cpu")
        lines.append(f"| {LABELS[name]} | {shown} | {'' if cpu is None else f'{cpu:.2f}'} | {goal} | {met} |")
    sizes = figures["sizes"]
    large = sizes["small_tokens"] * sizes["growth_factor"]
    raw = [
        f"{figures['model']} ({figures['parameters'] / 1e6:.1f}M parameters), {figures['device']} {figures['dtype']}, "
        f"{figures['threads']} threads, torch {figures['torch']}",
        f"matmul {sizes['matmul_size']}³: {figures['matmul_gflops']:.0f} GFLOP/s; "
        f"{sizes['compare_tokens']} tokens: fam {figures['fam_tokens_per_s']:.0f} tok/s, "
        f"own forward {figures['full_forward_tokens_per_s']:.0f} tok/s",
        f"{sizes['small_tokens']} tokens: trace on {figures['trace_on_s']:.2f} s, off {figures['trace_off_s']:.2f} s, "
        f"bswa {figures['bswa_s']:.2f} s; one block {figures['block_s'] * 1e3:.0f} ms"
        + (f", one probe {figures['probe_s'] * 1e3:.0f} ms" if figures.get("probe_s") else ""),
        f"{large} tokens: {figures['large_s']:.1f} s (small {figures['small_s']:.2f} s), per-block time last ÷ first "
        f"{sizes['small_tokens']} tokens {figures.get('growth_per_block', float('nan')):.2f}; peak memory "
        + (
            f"{figures['peak_large_mb']:.0f} MB vs {figures['peak_small_mb']:.0f} MB"
            if figures.get("peak_large_mb") and figures.get("peak_small_mb")
            else "n/a"
        )
        + (
            f"; compact trace {figures['trace_mb_large']:.1f} MB vs {figures['trace_mb_small']:.1f} MB, "
            f"state {figures['state_mb']:.1f} MB"
            if "trace_mb_large" in figures
            else ""
        ),
    ]
    if figures.get("probe_note"):
        raw.append(figures["probe_note"])
    return "\n".join(lines + [""] + raw)


def format_train_table(figures: dict) -> str:
    fam = figures["fam"]
    return "\n".join(
        [
            "| figure | measured | target | met |",
            "|---|---|---|---|",
            f"| training tok/s ÷ fam inference stream tok/s | {figures['train_vs_stream']:.2f} "
            f"| >= {figures['target']:.2f} | {'yes' if figures['met'] else 'no'} |",
            "",
            f"{figures['model']}, {figures['device']} {figures['dtype']}, {figures['threads']} threads; "
            f"block {fam['block_size']}, FAM {fam['fam_len']}, mem_blocks {fam['mem_blocks']}",
            f"training {figures['train_tokens_per_s']:.0f} tok/s (recipe {figures['recipe']}: "
            f"LoRA rank {figures['lora_rank']}, data {figures['data']}, read-out weight {figures['readout_weight']}, "
            f"layer recompute {'on' if figures['checkpoint_layers'] else 'off'}, "
            f"{figures['training_tokens_per_turn']} tokens a turn)",
            f"fam inference stream {figures['stream_tokens_per_s']:.0f} tok/s (trace recorded, "
            f"{figures['sizes']['stream_tokens']} tokens of GPL-3)",
        ]
    )

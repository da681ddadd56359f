"""``famviz ablate``: where the memory keeps the key — the FAM of a layer replaced after a block (ablated,
patched from another key's run, or patched back into a corrupted run) and log p(target) measured."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

from famviz.commands.options import add_geometry_options, add_json_option, add_model_options
from famviz.core.config import number_list
from famviz.errors import FamvizError

if TYPE_CHECKING:
    import argparse

    from famviz.probes.ablation import InterventionResult


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ablate",
        help="where the memory keeps the key: FAM ablation and patching, per layer and block",
        description="Replace the FAM of one layer (or all) after a block by the initial FAM (ablate), by the FAM of "
        "the same prompt with another key (patch), or patch the clean FAM into that corrupted run "
        "(write-time), and measure log p(target) at the question.",
    )
    parser.add_argument("--method", default="ablate", metavar="NAME", help="ablate, patch or write-time")
    parser.add_argument("--length", type=int, default=1024, metavar="N", help="PassKey prompt length in tokens")
    parser.add_argument("--depth", type=float, default=0.0, metavar="D", help="key depth, 0…1")
    parser.add_argument("--trials", type=int, default=4, metavar="N", help="keys to average over")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument(
        "--blocks",
        default=None,
        metavar="LIST",
        help="after which blocks the FAM is replaced: a list or 'all' (default: the last; write-time: all)",
    )
    parser.add_argument(
        "--layers",
        default=None,
        metavar="LIST",
        help="layers to intervene on one at a time (default: all; a row 'all' does every layer at once)",
    )
    parser.add_argument(
        "--head-layer",
        type=int,
        default=None,
        metavar="L",
        help="also replace one KV head group at a time of layer L (at the last block)",
    )
    parser.add_argument(
        "--text",
        default=None,
        metavar="PATH",
        help="instead of a PassKey prompt: this document as the prompt (with --target)",
    )
    parser.add_argument("--target", default=None, metavar="STRING", help="with --text: the continuation to score")
    add_geometry_options(parser, mem_help="the FAM alone carries the key: ", mem_default=0)
    add_model_options(parser)
    add_json_option(parser)
    parser.add_argument(
        "--figure", default=None, metavar="OUT", help="the layer × block heatmap (.png, .svg, .pdf, .html)"
    )
    parser.set_defaults(handler=run)


def _check_options(args: argparse.Namespace) -> None:
    if args.trials < 1 or args.length < 1 or not 0 <= args.depth <= 1:
        raise FamvizError("--trials and --length must be at least 1 and --depth between 0 and 1")
    if (args.text is None) != (args.target is None):
        raise FamvizError("--text and --target go together")
    if args.text is not None and args.method != "ablate":
        raise FamvizError(f"--method {args.method} needs a corrupted prompt: use it with PassKey prompts (no --text)")


def _cases(args: argparse.Namespace, tokenizer: object, text: str | None, block_size: int) -> list:
    """The prompts to intervene on: the given text with its target, or PassKey prompts with a corrupted twin."""
    from famviz.probes import ablation as ab

    try:
        if text is not None:
            return [(ab.text_case(tokenizer, text, args.target, block_size), None)]
        return ab.passkey_cases(tokenizer, block_size, args.length, args.depth, args.trials, args.seed)
    except ValueError as exc:  # e.g. a length shorter than the prompt without filler
        raise FamvizError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from famviz.commands.common import describe_run, load_for_cli, print_geometry_notes, resolve_backend, run_config
    from famviz.io.paths import check_figure_path
    from famviz.probes import ablation as ab

    ab.check_method(args.method)
    config = run_config(args, "fam")  # memory blocks default to 0 (the parser's), whatever the adapter's
    _check_options(args)
    blocks = None if args.blocks in (None, "all") else number_list(args.blocks, int, "--blocks")
    layers = None if args.layers is None else number_list(args.layers, int, "--layers")
    figure_out = check_figure_path(args.figure)
    text = None
    if args.text is not None:
        from famviz.io.documents import read_document

        text = read_document(args.text)
    loaded, fam_prompt = load_for_cli(args, config)
    print_geometry_notes(args.adapter, config)
    from famviz.core.fam_model import FamModel

    fam_model = FamModel(loaded, config, fam_prompt=fam_prompt, backend=resolve_backend(args.backend, loaded.device))
    cases = _cases(args, loaded.tokenizer, text, config.block_size)
    n_blocks = cases[0][0].blocks(config.block_size)
    if args.blocks == "all":
        blocks = list(range(1, n_blocks + 1))
    started = time.perf_counter()
    from tqdm import tqdm

    with tqdm(
        desc=f"{args.method}",
        unit="intervention",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=args.json and not sys.stderr.isatty(),
    ) as progress:
        result = ab.run_interventions(
            fam_model,
            cases,
            args.method,
            blocks=blocks,
            layers=layers,
            head_layer=args.head_layer,
            on_update=lambda _: progress.update(1),
        )
    result.config = {
        "model": loaded.name,
        "adapter": args.adapter,
        "length": args.length,
        "depth": args.depth,
        "seed": args.seed,
        "text": args.text,
        "target": args.target,
        **config.to_dict(),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
    }
    output = result.to_dict()
    output["seconds"] = round(time.perf_counter() - started, 2)
    caption = describe_run(loaded.name, loaded.adapter, config, f"{result.trials} trials, seed {args.seed}")
    if figure_out:
        from famviz.viz.export import write_figure
        from famviz.viz.passkey_figures import intervention_heatmap

        output["figure"] = str(
            write_figure(
                intervention_heatmap(output), figure_out, caption=caption, metadata=result.config, size=(1100, 700)
            )
        )
    if args.json:
        print(json.dumps(output))
    else:
        _print_table(args.method, caption, result)
    return 0


def _print_table(method: str, caption: str, result: InterventionResult) -> None:
    print(f"{method}: {caption}")  # what made the figures below
    print(
        f"log p(target), mean over {result.trials} trials: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.values.items())
    )
    print(f"Δ log p against the {result.reference} run (rows: layers; columns: FAM replaced after block …)")
    print("layer  " + "".join(f"{b:>8}" for b in result.blocks))
    for layer, row in zip(result.layers, result.delta, strict=True):
        print(f"{str(layer):>5}  " + "".join(f"{v:>+8.2f}" for v in row))
    if result.head_delta is not None:
        print(f"layer {result.head_layer}, KV head groups: " + "  ".join(f"{v:+.2f}" for v in result.head_delta))

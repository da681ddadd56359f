"""``famviz export TRACE``: a figure of a saved trace, written without a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    from famviz.viz.export import FIGURES, FORMATS, figure_help

    parser = commands.add_parser(
        "export",
        help="write a figure of a saved trace (png, svg, pdf or html; no model)",
        description=f"Figures: {figure_help()}. --figure all writes every one into the folder --out.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace file (.npz) from `stream --trace` or the app")
    parser.add_argument(
        "--figure",
        required=True,
        choices=[*FIGURES, "all"],
        metavar="NAME",
        help=f"one of: {', '.join(FIGURES)}, or all (every figure the trace has data for)",
    )
    parser.add_argument(
        "--format", default=None, choices=FORMATS, help="default: from --out's suffix (needed with --figure all)"
    )
    parser.add_argument("--out", required=True, metavar="PATH", help="file to write (a folder with --figure all)")
    parser.add_argument(
        "--view", default=None, help="heatmap/heads: block-fam, block-memory, block-block, block-sink or fam-block"
    )
    parser.add_argument("--block", type=int, default=None, help="heads: the block to drill into (default: last)")
    parser.add_argument(
        "--layer", type=int, default=None, help="heads: the layer to frame; lens: the layer decoded (default: top)"
    )
    parser.add_argument("--method", default="PCA", choices=["PCA", "UMAP"], help="trajectory projection")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from famviz.viz.export import ExportError, export_trace_figures, export_trace_file

    choices = dict(view=args.view, block=args.block, layer=args.layer, method=args.method)
    if args.figure != "all":
        print(export_trace_file(args.trace, args.figure, args.format, args.out, **choices))
        return 0
    if args.format is None:
        raise ExportError("--figure all needs --format (png, svg, pdf or html): --out names a folder")
    written, skipped = export_trace_figures(args.trace, args.format, args.out, **choices)
    for path in written:
        print(path)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0

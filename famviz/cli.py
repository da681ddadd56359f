"""Command line: ``python -m famviz stream PATH ...``. This module parses and dispatches; each command's
work is in ``famviz.commands`` (``evaluate``: ``famviz.training.evaluation``).

Results go to stdout (one JSON object with ``--json``); logs and the progress bar go to stderr.
User errors exit with status 2 and one line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from famviz import __version__
from famviz.core.config import FAM_NORMS, MODES, TOOL_DEFAULTS
from famviz.errors import FamvizError

log = logging.getLogger("famviz")

DESCRIPTION = "famviz: turn a Hugging Face causal LM into TransformerFAM and watch its working memory"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Hugging Face model id or local path (default: bundled SmolLM2-135M)"
    )
    parser.add_argument("--adapter", default=None, metavar="DIR", help="trained FAM adapter directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "sdpa", "flex", "flash"],
        help="attention kernel when no trace is recorded (auto: flash-attn on CUDA when installed, else sdpa)",
    )


def _add_fam_options(parser: argparse.ArgumentParser) -> None:
    defaults = TOOL_DEFAULTS
    parser.add_argument("--mode", default=defaults.mode, choices=MODES)
    _add_geometry_options(parser)
    _add_sink_option(parser)


def _add_geometry_options(parser: argparse.ArgumentParser, mem_help: str = "", mem_default: int | None = None) -> None:
    """Block size, FAM length and memory blocks; left out, they are the --adapter's trained geometry, else the
    defaults the app uses (``famviz.commands.run_config``). ``mem_default``: a fixed memory-block default
    instead (whatever the adapter was trained with)."""
    defaults = TOOL_DEFAULTS
    for flag, name, extra, default in (
        ("--block-size", "block_size", "", None),
        ("--fam-len", "fam_len", "", None),
        ("--mem-blocks", "mem_blocks", mem_help, mem_default),
    ):
        parser.add_argument(
            flag,
            type=int,
            default=default,
            metavar="N",
            help=f"{extra}default: the adapter's, else {getattr(defaults, name)}"
            if default is None
            else f"{extra}default {default}",
        )
    parser.add_argument(
        "--fam-norm",
        choices=FAM_NORMS,
        default=None,
        help="how FAM slots' norms evolve: grow (the paper's) or keep (each slot rescaled to its norm before "
        "the update); default: the adapter's, else grow",
    )


def _add_sink_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=TOOL_DEFAULTS.sink_tokens,
        metavar="S",
        help="sink mode: the stream's first S tokens stay visible for ever (StreamingLLM; default 4)",
    )


def _command(name: str):
    """The handler ``famviz.commands.<name>``, imported when the command runs (a parser loads nothing heavy)."""

    def run(args: argparse.Namespace) -> int:
        from famviz import commands

        return getattr(commands, name)(args)

    run.__name__ = name
    return run


def _run_evaluate(args: argparse.Namespace) -> int:
    from famviz.training.evaluation import run_evaluate  # the library, imported when the command runs

    return run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    prog = "famviz" if os.path.basename(sys.argv[0]) == "famviz" else "python -m famviz"  # the command, or -m
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging on stderr")
    parser.add_argument("--version", action="version", version=f"famviz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    stream = commands.add_parser("stream", help="stream a document through the model, block by block")
    stream.add_argument("path", help="document: .txt, .md, .pdf, .html or any UTF-8 text file")
    _add_fam_options(stream)
    _add_model_options(stream)
    stream.add_argument("--max-tokens", type=int, default=None, metavar="N", help="truncate the document to N tokens")
    stream.add_argument(
        "--trace",
        default=None,
        metavar="OUT",
        help="record the trace and save it to OUT (.npz); without it only the per-token NLL is kept",
    )
    stream.add_argument("--no-trace", action="store_true", help="record no trace even with --trace (fastest)")
    stream.add_argument(
        "--channels",
        default=None,
        metavar="PATTERNS",
        help="comma-separated trace channel patterns to record, e.g. 'block.*.share,tokens.nll'",
    )
    stream.add_argument("--json", action="store_true", help="print one JSON object with the results")
    stream.set_defaults(handler=_command("run_stream"))

    from famviz.viz.export import FIGURES, FORMATS, figure_help

    export = commands.add_parser(
        "export",
        help="write a figure of a saved trace (png, svg, pdf or html; no model)",
        description=f"Figures: {figure_help()}.",
    )
    export.add_argument("trace", metavar="TRACE", help="trace file (.npz) from `stream --trace` or the app")
    export.add_argument(
        "--figure", required=True, choices=list(FIGURES), metavar="NAME", help=f"one of: {', '.join(FIGURES)}"
    )
    export.add_argument("--format", default=None, choices=FORMATS, help="default: from --out's suffix")
    export.add_argument("--out", required=True, metavar="PATH", help="file to write")
    export.add_argument(
        "--view", default=None, help="heatmap/heads: block-fam, block-memory, block-block, block-sink or fam-block"
    )
    export.add_argument("--block", type=int, default=None, help="heads: the block to drill into (default: last)")
    export.add_argument("--layer", type=int, default=None, help="heads: the layer to frame")
    export.add_argument("--method", default="PCA", choices=["PCA", "UMAP"], help="trajectory projection")
    export.set_defaults(handler=_command("run_export"))

    train = commands.add_parser("train", help="fine-tune the FAM (LoRA + learned FAM prompt) or a BSWA baseline")
    from famviz.training.config import add_train_arguments

    add_train_arguments(train)
    train.set_defaults(handler=_command("run_train"))

    evaluate = commands.add_parser(
        "evaluate",
        help="every check of an adapter (or the untuned conversion): PassKey grid against bswa and full, "
        "long-document NLL per quarter, in-window loss, FAM norm",
        description="Results go to stdout (a table, or JSON with --json); with --write-card also into the "
        "adapter's training card. --quick: a smoke check in about 1.5 minutes on a 2-core CPU.",
    )
    from famviz.training.evaluate_options import add_evaluate_arguments

    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=_run_evaluate)

    passkey = commands.add_parser(
        "passkey",
        help="PassKey retrieval: length × depth sweeps, or a live retention curve",
        description="Hide a pass key in filler (docs/algorithm.md §7) or your own document and ask "
        "for it at the end; answers are scored by their first integer.",
    )
    passkey.add_argument(
        "--modes",
        default="fam,bswa,full",
        metavar="LIST",
        help="comma-separated modes; MODE:N sets mode's memory blocks, e.g. fam:0,bswa:0,bswa:1,full",
    )
    passkey.add_argument("--lengths", default="1000,2000,4000", metavar="LIST", help="prompt lengths in tokens")
    passkey.add_argument(
        "--depths",
        default="0,0.5,1",
        metavar="LIST",
        help="key depths from 0 (right after the instruction) to 1 (right before the question)",
    )
    passkey.add_argument("--trials", type=int, default=10, metavar="N", help="keys per cell")
    passkey.add_argument("--seed", type=int, default=0, metavar="S")
    _add_geometry_options(passkey, mem_help="memory blocks for modes given without :N; ")
    _add_sink_option(passkey)
    _add_model_options(passkey)
    passkey.add_argument(
        "--document",
        default=None,
        metavar="PATH",
        help="hide the key in this document (cut to each length) instead of the standard filler",
    )
    passkey.add_argument(
        "--retention",
        action="store_true",
        help="instead of a sweep: stream one prompt per cell and probe the memory as it goes",
    )
    passkey.add_argument(
        "--probe-every", type=int, default=1, metavar="K", help="with --retention: probe every K blocks"
    )
    passkey.add_argument("--json", action="store_true", help="print one JSON object with the results")
    passkey.add_argument(
        "--figure",
        default=None,
        metavar="OUT",
        help="write the accuracy heatmap (or retention curves) to OUT (.png, .svg, .pdf or .html)",
    )
    passkey.set_defaults(handler=_command("run_passkey"))

    ablate = commands.add_parser(
        "ablate",
        help="where the memory keeps the key: FAM ablation and patching, per layer and block",
        description="Replace the FAM of one layer (or all) after a block by the initial FAM (ablate), by the FAM of "
        "the same prompt with another key (patch), or patch the clean FAM into that corrupted run "
        "(write-time), and measure log p(target) at the question.",
    )
    ablate.add_argument("--method", default="ablate", metavar="NAME", help="ablate, patch or write-time")
    ablate.add_argument("--length", type=int, default=1024, metavar="N", help="PassKey prompt length in tokens")
    ablate.add_argument("--depth", type=float, default=0.0, metavar="D", help="key depth, 0…1")
    ablate.add_argument("--trials", type=int, default=4, metavar="N", help="keys to average over")
    ablate.add_argument("--seed", type=int, default=0, metavar="S")
    ablate.add_argument(
        "--blocks",
        default=None,
        metavar="LIST",
        help="after which blocks the FAM is replaced: a list or 'all' (default: the last; write-time: all)",
    )
    ablate.add_argument(
        "--layers",
        default=None,
        metavar="LIST",
        help="layers to intervene on one at a time (default: all; a row 'all' does every layer at once)",
    )
    ablate.add_argument(
        "--head-layer",
        type=int,
        default=None,
        metavar="L",
        help="also replace one KV head group at a time of layer L (at the last block)",
    )
    ablate.add_argument(
        "--text",
        default=None,
        metavar="PATH",
        help="instead of a PassKey prompt: this document as the prompt (with --target)",
    )
    ablate.add_argument("--target", default=None, metavar="STRING", help="with --text: the continuation to score")
    _add_geometry_options(ablate, mem_help="the FAM alone carries the key: ", mem_default=0)
    _add_model_options(ablate)
    ablate.add_argument("--json", action="store_true", help="print one JSON object with the results")
    ablate.add_argument(
        "--figure", default=None, metavar="OUT", help="the layer × block heatmap (.png, .svg, .pdf, .html)"
    )
    ablate.set_defaults(handler=_command("run_ablate"))

    bench = commands.add_parser("bench", help="speed and memory figures of streaming, measured side by side")
    bench.add_argument("--quick", action="store_true", help="smaller documents (a few minutes)")
    bench.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="default auto: bfloat16 where the CPU or GPU computes it, else float32",
    )
    bench.add_argument(
        "--model", default=None, help="Hugging Face model id or local path (default: bundled SmolLM2-135M)"
    )
    bench.add_argument(
        "--train",
        action="store_true",
        help="instead: training tok/s of the shipped recipe against the fam inference stream's tok/s",
    )
    bench.add_argument(
        "--recipe",
        metavar="ADAPTER_DIR",
        default=None,
        help="with --train: the run whose train_config.json is the recipe (default: the shipped adapter)",
    )
    bench.set_defaults(handler=_command("run_bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    # famviz never downloads at run time: hub ids resolve from the local HF cache only
    # (set HF_HUB_OFFLINE=0 to allow downloads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what the user typed: training records it as the run's command
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr, format="%(message)s"
    )
    _quiet_libraries(args.verbose)
    try:
        return args.handler(args)
    except FamvizError as exc:
        print(f"famviz: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("famviz: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

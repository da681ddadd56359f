"""Command line: ``python -m famviz stream PATH ...``. This module builds the parser from the commands'
modules (``famviz.commands``, one per command, each with its options and its run) and dispatches.

Results go to stdout (one JSON object with ``--json``); logs and the progress bar go to stderr.
User errors exit with status 2 and one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from famviz import __version__
from famviz.commands import COMMANDS
from famviz.errors import FamvizError

log = logging.getLogger("famviz")

DESCRIPTION = "famviz: turn a Hugging Face causal LM into TransformerFAM and watch its working memory"


def build_parser() -> argparse.ArgumentParser:
    prog = "famviz" if os.path.basename(sys.argv[0]) == "famviz" else "python -m famviz"  # the command, or -m
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging on stderr")
    parser.add_argument("--version", action="version", version=f"famviz {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"famviz.commands.{name}").add_parser(subparsers)
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

"""``famviz app`` (or ``python app.py``): serve the live memory inspector in the browser."""

from __future__ import annotations

import argparse
import logging
import sys

from famviz.app import MIN_REDRAW_SECONDS  # light: the package's own module imports no gradio
from famviz.commands.options import MODEL_HELP, add_device_options

DESCRIPTION = "famviz app: the live memory inspector of a TransformerFAM model"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("app", help="serve the live memory inspector in the browser", description=DESCRIPTION)
    add_app_options(parser)
    parser.set_defaults(handler=run)


def add_app_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="ID_OR_PATH", help=MODEL_HELP)
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="trained FAM adapter directory; 'none' for the untuned conversion (default: the "
        "shipped tuned FAM adapter with the bundled model, none with --model)",
    )
    add_device_options(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument(
        "--redraw-seconds",
        type=float,
        default=MIN_REDRAW_SECONDS,
        metavar="S",
        help=f"while blocks come faster, redraw the plots at most every S seconds "
        f"(default {MIN_REDRAW_SECONDS:g}; the status line updates after every block)",
    )


def standalone_parser() -> argparse.ArgumentParser:
    """``python app.py``'s parser: the same options, and its own --verbose."""
    parser = argparse.ArgumentParser(prog="python app.py", description=DESCRIPTION)
    add_app_options(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging on stderr")
    return parser


def run(args: argparse.Namespace, started: float | None = None) -> int:
    if args.redraw_seconds < 0:
        print("famviz: error: --redraw-seconds must be 0 or more", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.INFO if args.verbose else logging.WARNING)  # gradio's own pings
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    from famviz.app.launch import serve

    return serve(
        args.model, args.adapter, args.device, args.dtype, args.host, args.port, args.redraw_seconds, started=started
    )


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """``python app.py``: ``started`` is ``time.perf_counter()`` when the launcher began, so that the log says
    what importing the libraries took."""
    return run(standalone_parser().parse_args(argv), started=started)

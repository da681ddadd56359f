"""Options several commands share: the model to load, the FAM's mode and geometry, the sink's size."""

from __future__ import annotations

import argparse

from famviz.core.config import FAM_NORMS, MODES, TOOL_DEFAULTS  # light: no torch

MODEL_HELP = "Hugging Face model id or local path (default: bundled SmolLM2-135M)"


def add_model_options(parser: argparse.ArgumentParser, backend: bool = True) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--adapter", default=None, metavar="DIR", help="trained FAM adapter directory")
    add_device_options(parser)
    if backend:
        parser.add_argument(
            "--backend",
            default="auto",
            choices=["auto", "sdpa", "flex", "flash"],
            help="attention kernel when no trace is recorded (auto: flash-attn on CUDA when installed, else sdpa)",
        )


def add_device_options(parser: argparse.ArgumentParser, dtype_help: str | None = None) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help=dtype_help)


def add_fam_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default=TOOL_DEFAULTS.mode, choices=MODES)
    add_geometry_options(parser)
    add_sink_option(parser)


def add_geometry_options(parser: argparse.ArgumentParser, mem_help: str = "", mem_default: int | None = None) -> None:
    """Block size, FAM length and memory blocks; left out, they are the --adapter's trained geometry, else the
    defaults the app uses (``famviz.commands.common.run_config``). ``mem_default``: a fixed memory-block default
    instead (whatever the adapter was trained with)."""
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
            help=f"{extra}default: the adapter's, else {getattr(TOOL_DEFAULTS, name)}"
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


def add_sink_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=TOOL_DEFAULTS.sink_tokens,
        metavar="S",
        help="sink mode: the stream's first S tokens stay visible for ever (StreamingLLM; default 4)",
    )


def add_json_option(parser: argparse.ArgumentParser, help_text: str = "print one JSON object with the results") -> None:
    parser.add_argument("--json", action="store_true", help=help_text)

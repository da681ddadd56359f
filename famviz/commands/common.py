"""What the model-running commands share once their options are parsed: the run's geometry, the model and
adapter loaded, notes about the geometry, the attention back end, a caption naming the run."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from famviz.core.config import FamConfig, check_limits
from famviz.errors import FamvizError

if TYPE_CHECKING:
    import argparse

    import torch

    from famviz.core.model import LoadedModel

log = logging.getLogger("famviz")


def run_config(args: argparse.Namespace, mode: str) -> FamConfig:
    """The run's FAM geometry (``famviz.io.adapters.run_geometry``): each option given, else the --adapter's
    trained value (as the app applies it), else the defaults shared with the app (``TOOL_DEFAULTS``);
    checked against the limits."""
    from famviz.io.adapters import GEOMETRY_SETTINGS, read_adapter, run_geometry

    adapter = read_adapter(args.adapter) if getattr(args, "adapter", None) else None
    given = {name: getattr(args, name, None) for name in GEOMETRY_SETTINGS}
    try:
        return check_limits(run_geometry(adapter, mode, **given))
    except ValueError as exc:
        raise FamvizError(str(exc)) from None


def load_for_cli(args: argparse.Namespace, config: FamConfig) -> tuple[LoadedModel, torch.Tensor | None]:
    """The model and (with --adapter) the trained FAM prompt, with adapter LoRA merged."""
    from famviz.io.models import load_model

    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    fam_prompt = None
    if args.adapter:
        from famviz.io.adapters import apply_adapter

        fam_prompt = apply_adapter(args.adapter, loaded, config)
    log.info(
        "model %s loaded in %.1f s on %s (%s)", loaded.name, time.perf_counter() - started, loaded.device, loaded.dtype
    )
    return loaded, fam_prompt


def print_geometry_notes(adapter_dir: str | None, *configs: FamConfig) -> None:
    """On stderr, once the run is about to start: settings that are allowed but probably not meant (a block
    shorter than the FAM), and how the runs' ``configs`` differ from what the adapter was trained with."""
    from famviz.io.adapters import read_adapter, run_notes

    adapter = read_adapter(adapter_dir) if adapter_dir else None
    notes = [note for config in configs for note in run_notes(config, adapter)]
    for note in dict.fromkeys(notes):
        print(f"famviz: note: {note}", file=sys.stderr)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The attention back end ``name`` names on ``device`` (auto: flash-attn where it is installed, else SDPA)."""
    from famviz.core.attention import available_backends

    available = available_backends(device)
    if name == "auto":
        return "flash" if "flash" in available else "sdpa"
    if name not in available:
        raise FamvizError(
            f"attention back end {name!r} is not available on {device}; available: {', '.join(available)}"
        )
    return name


def describe_run(model: str, adapter: str | None, config: FamConfig, extra: str) -> str:
    """A figure's caption: the model and adapter, the geometry, and ``extra``."""
    from famviz.core.model import describe_model

    return (
        f"{describe_model(model, adapter)}; block {config.block_size}, FAM {config.fam_len}, "
        f"memory blocks {config.mem_blocks}; {extra}"
    )

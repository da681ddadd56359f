"""The command line's commands (``famviz.cli`` parses and dispatches here): stream, passkey, ablate, export,
bench, train. Each takes the parsed arguments and returns the exit status; user errors are ``FamvizError``s,
which the CLI turns into one line and status 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.core.config import FamConfig, check_limits, number_list
from famviz.errors import FamvizError
from famviz.io.paths import check_figure_path, check_output_path

if TYPE_CHECKING:
    import argparse

    import plotly.graph_objects as go
    import torch

    from famviz.core.engine import StreamResult
    from famviz.core.model import LoadedModel
    from famviz.probes.passkey import ModeSpec, RetentionPoint

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


def run_passkey(args: argparse.Namespace) -> int:
    from famviz.probes import passkey as pk

    base = run_config(args, "fam")
    try:
        specs = [pk.ModeSpec.parse(part, base.mem_blocks) for part in args.modes.split(",") if part.strip()]
        for spec in specs:
            check_limits(pk.sweep_config(base, spec))
    except ValueError as exc:
        raise FamvizError(str(exc)) from None
    lengths = number_list(args.lengths, int, "--lengths")
    depths = number_list(args.depths, float, "--depths")
    if not specs:
        raise FamvizError("--modes is empty")
    if any(n <= 0 for n in lengths) or any(not 0 <= d <= 1 for d in depths):
        raise FamvizError("lengths must be positive and depths between 0 and 1")
    if args.trials < 1 or args.probe_every < 1:
        raise FamvizError("--trials and --probe-every must be at least 1")
    figure_out = check_figure_path(args.figure)
    text = None
    if args.document:
        from famviz.io.documents import read_document

        text = read_document(args.document)
    loaded, fam_prompt = load_for_cli(args, base)
    backend = resolve_backend(args.backend, loaded.device)
    # Notes about the runs the adapter is used in (a sweep's fam columns), not about the --mem-blocks default.
    tuned = [pk.sweep_config(base, spec) for spec in specs if spec.mode == "fam"]
    print_geometry_notes(args, *(tuned or [base]))
    config = {
        "block_size": base.block_size,
        "fam_len": base.fam_len,
        "sink_tokens": base.sink_tokens,
        "modes": [s.label for s in specs],
        "lengths": lengths,
        "depths": depths,
        "trials": args.trials,
        "seed": args.seed,
        "model": loaded.name,
        "adapter": args.adapter,
        "document": args.document,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
    }
    started = time.perf_counter()
    if args.retention:
        output, figure = _passkey_retention(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend)
    else:
        output, figure = _passkey_sweep(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend)
    output["config"] = config
    output["seconds"] = round(time.perf_counter() - started, 2)
    if figure_out:
        from famviz.viz.export import write_figure

        caption = (
            f"{loaded.name}; block {base.block_size}, fam_len {base.fam_len}; {args.trials} trials per cell, "
            f"seed {args.seed}"
        )
        output["figure"] = str(write_figure(figure, figure_out, caption=caption, metadata=config, size=(1100, 420)))
    if args.json:
        print(json.dumps(output))
    elif not args.retention:
        print(f"{'mode':>14}  {'length':>7}  {'depth':>5}  {'trials':>6}  {'accuracy':>8}  {'mean log p(key)':>15}")
        for cell in output["results"]:
            print(
                f"{cell['label']:>14}  {cell['length']:>7}  {cell['depth']:>5g}  {cell['trials']:>6}  "
                f"{cell['accuracy']:>8.1%}  {cell['mean_key_logprob']:>15.2f}"
            )
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from famviz.probes import ablation as ab

    ab.check_method(args.method)
    config = run_config(args, "fam")  # memory blocks default to 0 (the parser's), whatever the adapter's
    if args.trials < 1 or args.length < 1 or not 0 <= args.depth <= 1:
        raise FamvizError("--trials and --length must be at least 1 and --depth between 0 and 1")
    if (args.text is None) != (args.target is None):
        raise FamvizError("--text and --target go together")
    if args.text is not None and args.method != "ablate":
        raise FamvizError(f"--method {args.method} needs a corrupted prompt: use it with PassKey prompts (no --text)")
    blocks = None if args.blocks in (None, "all") else number_list(args.blocks, int, "--blocks")
    layers = None if args.layers is None else number_list(args.layers, int, "--layers")
    figure_out = check_figure_path(args.figure)
    text = None
    if args.text is not None:
        from famviz.io.documents import read_document

        text = read_document(args.text)
    loaded, fam_prompt = load_for_cli(args, config)
    print_geometry_notes(args, config)
    from famviz.core.fam_model import FamModel

    fam_model = FamModel(loaded, config, fam_prompt=fam_prompt, backend=resolve_backend(args.backend, loaded.device))
    try:
        if text is not None:
            cases = [(ab.text_case(loaded.tokenizer, text, args.target, config.block_size), None)]
        else:
            cases = ab.passkey_cases(
                loaded.tokenizer, config.block_size, args.length, args.depth, args.trials, args.seed
            )
    except ValueError as exc:  # e.g. a length shorter than the prompt without filler
        raise FamvizError(str(exc)) from None
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
        print(f"{args.method}: {caption}")  # what made the figures below
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
    return 0


def describe_run(model: str, adapter: str | None, config: FamConfig, extra: str) -> str:
    from famviz.core.model import describe_model

    return (
        f"{describe_model(model, adapter)}; block {config.block_size}, FAM {config.fam_len}, "
        f"memory blocks {config.mem_blocks}; {extra}"
    )


def _passkey_sweep(
    loaded: LoadedModel,
    specs: list[ModeSpec],
    base: FamConfig,
    lengths: list[int],
    depths: list[float],
    args: argparse.Namespace,
    text: str | None,
    fam_prompt: torch.Tensor | None,
    backend: str,
) -> tuple[dict, go.Figure]:
    from tqdm import tqdm

    from famviz.probes import passkey as pk
    from famviz.viz.passkey_figures import passkey_heatmap

    try:
        documents = pk.sweep_documents(loaded.tokenizer, lengths, depths, args.trials, args.seed, text)
    except ValueError as exc:
        raise FamvizError(str(exc)) from None
    cells = []
    total = len(specs) * len(documents) * args.trials
    with tqdm(total=total, unit="trial", file=sys.stderr, dynamic_ncols=True) as bar:
        for step in pk.iter_sweep(loaded, specs, documents, base, fam_prompt, backend):
            cell = step.cell
            bar.set_description(f"{cell.label} {cell.length} tok depth {cell.depth:g}")
            bar.update(1)
            if not step.cell_done:
                continue
            cells.append(cell)
            # One line per cell on stderr, also with --json: partial results survive an interruption.
            bar.write(
                f"{cell.label:>14}  length {cell.length:>6}  depth {cell.depth:4g}  "
                f"accuracy {cell.accuracy:6.1%}  mean log p(key) {cell.mean_key_logprob:8.2f}  "
                f"({cell.seconds:.1f} s)",
                file=sys.stderr,
            )
    return {"results": [cell.summary() for cell in cells]}, passkey_heatmap(cells)


def _passkey_retention(
    loaded: LoadedModel,
    specs: list[ModeSpec],
    base: FamConfig,
    lengths: list[int],
    depths: list[float],
    args: argparse.Namespace,
    text: str | None,
    fam_prompt: torch.Tensor | None,
    backend: str,
) -> tuple[dict, go.Figure]:
    from famviz.core.fam_model import FamModel
    from famviz.probes import passkey as pk
    from famviz.viz.passkey_figures import retention_figure

    curves, last = [], None
    for spec in specs:
        fam_model = FamModel(loaded, pk.sweep_config(base, spec), backend=backend, fam_prompt=fam_prompt)
        for length in lengths:
            for depth in depths:
                document = pk.trial_documents(loaded.tokenizer, length, depth, 1, args.seed, text)[0]

                def show(point: RetentionPoint, label: str = spec.label) -> None:
                    if not args.json:
                        print(
                            f"{label:>14}  block {point.block:>4}  blocks since key {point.blocks_since_key:>4}  "
                            f"{'retrieved' if point.correct else 'lost     '}  answer {point.predicted}  "
                            f"log p(key) {point.key_logprob:8.2f}",
                            flush=True,
                        )

                points = pk.retention_curve(fam_model, document, args.probe_every, on_point=show)
                last = (points, document.key)
                curves.append(
                    {
                        "mode": spec.mode,
                        "mem_blocks": spec.mem_blocks,
                        "label": spec.label,
                        "length": length,
                        "depth": depth,
                        "key": document.key,
                        "points": [vars(p) for p in points],
                    }
                )
    return {"retention": curves}, retention_figure(*last)


def run_export(args: argparse.Namespace) -> int:
    from famviz.viz.export import export_trace_file

    path = export_trace_file(
        args.trace,
        args.figure,
        args.format,
        args.out,
        view=args.view,
        block=args.block,
        layer=args.layer,
        method=args.method,
    )
    print(path)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from famviz.bench import FULL, QUICK, format_table
    from famviz.bench import run_bench as bench_main
    from famviz.io.models import load_model

    if args.train:
        from famviz.bench import TRAIN_QUICK, TrainBenchSizes, format_train_table, run_train_bench

        figures = run_train_bench(
            args.model,
            args.device,
            args.dtype,
            TRAIN_QUICK if args.quick else TrainBenchSizes(),
            recipe_dir=args.recipe,
            progress=lambda message: log.warning("bench: %s", message),
        )
        print(json.dumps(figures) if args.json else format_train_table(figures))
        return 0
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    figures = bench_main(
        loaded, QUICK if args.quick else FULL, progress=lambda message: log.warning("bench: %s", message)
    )
    print(json.dumps(figures) if args.json else format_table(figures))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from famviz.training.loop import run_train as train_main

    return train_main(args)


# -- stream ---------------------------------------------------------------------------------------
def run_stream(args: argparse.Namespace) -> int:
    from famviz.io.documents import head_bytes_for, read_document_start

    config = run_config(args, args.mode)
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise FamvizError(f"--max-tokens must be positive, got {args.max_tokens}")
    trace_out = check_output_path(args.trace) if args.trace else None
    document = read_document_start(args.path, head_bytes_for(args.max_tokens))
    if document.cut:  # a large text file: only the part --max-tokens can use was read
        print(f"famviz: note: read {document.cut} (enough for --max-tokens {args.max_tokens:,})", file=sys.stderr)
    text = document.text
    loaded, fam_prompt = load_for_cli(args, config)
    channels = args.channels.split(",") if args.channels else None
    from famviz.core.trace import ChannelSelection

    ChannelSelection(channels, loaded.config.num_hidden_layers, fam=config.active_fam_len > 0)  # fail before streaming
    print_geometry_notes(args, config)
    import gc

    gc.collect()
    from famviz.process import peak_rss_mb, reset_window_peak_rss, window_peak_rss_mb

    load_peak_mb = peak_rss_mb()  # the reset below also resets getrusage's figure
    can_window = reset_window_peak_rss()  # after loading: the stream's own peak, not the load's
    from famviz.core.tokenize import tokenize_document, tokenize_prefix

    if args.max_tokens is not None:  # no need to tokenise the rest of a huge document
        ids, offsets = tokenize_prefix(loaded.tokenizer, text, args.max_tokens)
    else:
        ids, offsets = tokenize_document(loaded.tokenizer, text)
    if not ids:
        raise FamvizError(f"{args.path}: the document has no tokens")
    record = bool(args.trace) and not args.no_trace  # nothing that grows with the document is kept otherwise
    result = stream_with_progress(
        loaded,
        config,
        ids,
        document=(Path(args.path).name, text, offsets),
        fam_prompt=fam_prompt,
        record=record,
        channels=channels,
        backend=resolve_backend(args.backend, loaded.device),
    )
    trace_path = None
    if result.trace is not None:
        if trace_out:
            try:
                trace_path = str(result.trace.save(trace_out))
            except OSError as exc:
                raise FamvizError(f"cannot write the trace to {trace_out}: {exc.strerror or exc}") from None
    summary = {
        "document": Path(args.path).name,
        "mode": config.mode,
        "tokens": result.tokens,
        "blocks": result.blocks,
        "block_size": config.block_size,
        "fam_len": config.active_fam_len,
        "mem_blocks": config.mem_blocks,
        "sink_tokens": config.active_sink_tokens,
        "nll_mean": result.nll_mean,
        "seconds": round(result.seconds, 4),
        "tokens_per_s": round(result.tokens_per_s, 2),
        "peak_rss_mb": round(max(load_peak_mb, peak_rss_mb()), 1),
        "stream_peak_rss_mb": round(window_peak_rss_mb(), 1) if can_window else None,
        "state_bytes": result.state_bytes,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "model": loaded.name,
        "adapter": loaded.adapter,
        "trace": trace_path,
        "trace_bytes": result.trace.nbytes() if result.trace is not None else 0,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>13}: {value}")
    return 0


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


def print_geometry_notes(args: argparse.Namespace, *configs: FamConfig) -> None:
    """On stderr, once the run is about to start: settings that are allowed but probably not meant (a block
    shorter than the FAM), and how the runs' ``configs`` differ from what ``--adapter`` was trained with."""
    from famviz.io.adapters import read_adapter, run_notes

    adapter = read_adapter(args.adapter) if args.adapter else None
    notes = [note for config in configs for note in run_notes(config, adapter)]
    for note in dict.fromkeys(notes):
        print(f"famviz: note: {note}", file=sys.stderr)


def resolve_backend(name: str, device: torch.device | str) -> str:
    from famviz.core.attention import available_backends

    available = available_backends(device)
    if name == "auto":
        return "flash" if "flash" in available else "sdpa"
    if name not in available:
        raise FamvizError(
            f"attention back end {name!r} is not available on {device}; available: {', '.join(available)}"
        )
    return name


def stream_with_progress(
    loaded: LoadedModel, config: FamConfig, ids: list[int], document: tuple | None = None, **kwargs
) -> StreamResult:
    """Run a stream with a progress bar on stderr (shown for documents of more than one block);
    ``document`` = (name, text, offsets) goes into the trace."""
    from tqdm import tqdm

    from famviz.core.engine import Stream

    n_blocks = -(-len(ids) // config.block_size)
    stream = Stream(loaded, config, **kwargs)
    if document is not None:
        stream.describe_document(*document)
    with tqdm(
        total=len(ids), unit="tok", file=sys.stderr, disable=n_blocks < 2, dynamic_ncols=True, desc=f"{config.mode}"
    ) as bar:
        for block in stream.blocks(ids):
            bar.update(len(block.token_ids))
    return stream.result()

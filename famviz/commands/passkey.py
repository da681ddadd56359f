"""``famviz passkey``: PassKey retrieval, a length × depth sweep of modes on the same keys, a live
retention curve (one prompt per cell, the memory probed as it streams), or each answer's attribution
through the memory."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, NamedTuple

from famviz.commands.options import add_geometry_options, add_json_option, add_model_options, add_sink_option
from famviz.core.config import FamConfig, check_limits, number_list
from famviz.errors import FamvizError

if TYPE_CHECKING:
    import argparse

    import plotly.graph_objects as go
    import torch

    from famviz.core.model import LoadedModel
    from famviz.probes.passkey import ModeSpec, RetentionPoint


class PasskeyRun(NamedTuple):
    """What each kind of run (sweep, retention, attribution) works on."""

    loaded: LoadedModel
    specs: list[ModeSpec]
    base: FamConfig
    lengths: list[int]
    depths: list[float]
    args: argparse.Namespace  # trials, seed, probe_every, json
    text: str | None  # --document's text (None: the standard filler)
    fam_prompt: torch.Tensor | None
    backend: str


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "passkey",
        help="PassKey retrieval: length × depth sweeps, or a live retention curve",
        description="Hide a pass key in filler (docs/algorithm.md §7) or your own document and ask "
        "for it at the end; answers are scored by their first integer.",
    )
    parser.add_argument(
        "--modes",
        default="fam,bswa,full",
        metavar="LIST",
        help="comma-separated modes; MODE:N sets mode's memory blocks, e.g. fam:0,bswa:0,bswa:1,full",
    )
    parser.add_argument("--lengths", default="1000,2000,4000", metavar="LIST", help="prompt lengths in tokens")
    parser.add_argument(
        "--depths",
        default="0,0.5,1",
        metavar="LIST",
        help="key depths from 0 (right after the instruction) to 1 (right before the question)",
    )
    parser.add_argument("--trials", type=int, default=10, metavar="N", help="keys per cell")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    add_geometry_options(parser, mem_help="memory blocks for modes given without :N; ")
    add_sink_option(parser)
    add_model_options(parser)
    parser.add_argument(
        "--document",
        default=None,
        metavar="PATH",
        help="hide the key in this document (cut to each length) instead of the standard filler",
    )
    parser.add_argument(
        "--retention",
        action="store_true",
        help="instead of a sweep: stream one prompt per cell and probe the memory as it goes",
    )
    parser.add_argument(
        "--probe-every", type=int, default=1, metavar="K", help="with --retention: probe every K blocks"
    )
    parser.add_argument(
        "--attribution",
        action="store_true",
        help="instead of a sweep: attribute each answer's log p to every prompt token through the stream "
        "(gradient × input) and count the trials where the key sentence carries the most of any span "
        "of its length before the question (--figure: the first trial's attribution)",
    )
    add_json_option(parser)
    parser.add_argument(
        "--figure",
        default=None,
        metavar="OUT",
        help="write the accuracy heatmap (or retention curves) to OUT (.png, .svg, .pdf or .html)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from famviz.commands.common import load_for_cli, print_geometry_notes, resolve_backend, run_config
    from famviz.io.paths import check_figure_path
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
    tuned = [config for config in (pk.sweep_config(base, spec) for spec in specs) if config.active_fam_len]
    print_geometry_notes(args.adapter, *(tuned or [base]))
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
    if args.retention and args.attribution:
        raise FamvizError("--retention and --attribution are two different runs: choose one")
    run_cells = _retention if args.retention else _attribution if args.attribution else _sweep
    output, figure = run_cells(PasskeyRun(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend))
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
    elif args.attribution:
        print(f"{'mode':>14}  {'length':>7}  {'depth':>5}  {'trials':>6}  {'key first':>9}  {'key / best other':>16}")
        for cell in output["attribution"]:
            print(
                f"{cell['label']:>14}  {cell['length']:>7}  {cell['depth']:>5g}  {cell['trials']:>6}  "
                f"{cell['key_beats_rate']:>9.1%}  {cell['median_key_over_best_other']:>16.2f}"
            )
    elif not args.retention:
        print(f"{'mode':>14}  {'length':>7}  {'depth':>5}  {'trials':>6}  {'accuracy':>8}  {'mean log p(key)':>15}")
        for cell in output["results"]:
            print(
                f"{cell['label']:>14}  {cell['length']:>7}  {cell['depth']:>5g}  {cell['trials']:>6}  "
                f"{cell['accuracy']:>8.1%}  {cell['mean_key_logprob']:>15.2f}"
            )
    return 0


def _sweep(run: PasskeyRun) -> tuple[dict, go.Figure]:
    loaded, specs, base, lengths, depths, args, text, fam_prompt, backend = run
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


def _attribution(run: PasskeyRun) -> tuple[dict, go.Figure]:
    loaded, specs, base, lengths, depths, args, text, fam_prompt, backend = run
    import numpy as np
    from tqdm import tqdm

    from famviz.core.fam_model import FamModel
    from famviz.probes import passkey as pk
    from famviz.probes.attribution import attribute, key_over_best_other
    from famviz.viz.passkey_figures import attribution_figure

    cells, first = [], None
    with tqdm(total=len(specs) * len(lengths) * len(depths) * args.trials, unit="trial", file=sys.stderr) as bar:
        for spec in specs:
            config = pk.sweep_config(base, spec)
            fam_model = FamModel(loaded, config, fam_prompt=fam_prompt if config.active_fam_len else None)
            for length in lengths:
                for depth in depths:
                    documents = pk.trial_documents(loaded.tokenizer, length, depth, args.trials, args.seed, text)
                    beats, ratios = [], []
                    for document in documents:
                        scores = attribute(fam_model, document.token_ids, document.answer_ids).scores
                        ratios.append(key_over_best_other(scores, document.key_span, document.question_start))
                        beats.append(ratios[-1] > 1.0)
                        first = first or (scores, document, spec.label)
                        bar.update(1)
                    cells.append(
                        {
                            "label": spec.label,
                            "length": length,
                            "depth": depth,
                            "trials": len(documents),
                            "key_beats_rate": sum(beats) / len(beats),
                            "median_key_over_best_other": float(np.median(ratios)),
                        }
                    )
    scores, document, label = first
    title = f"Attribution of the answer through the memory ({label}, {document.length} tokens, key {document.key})"
    figure = attribution_figure(scores, document.key_span, document.question_start, base.block_size, title)
    return {"attribution": cells}, figure


def _retention(run: PasskeyRun) -> tuple[dict, go.Figure]:
    loaded, specs, base, lengths, depths, args, text, fam_prompt, backend = run
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

"""Command line: ``python -m famviz stream PATH ...``.

Results go to stdout (one JSON object with ``--json``); logs and the progress bar go to stderr.
User errors exit with status 2 and one line, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from famviz import __version__
from famviz.core.config import MODES, TOOL_DEFAULTS, FamConfig, check_limits, number_list
from famviz.errors import FamvizError

log = logging.getLogger("famviz")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face model id or local path (default: bundled SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, metavar="DIR", help="trained FAM adapter directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "sdpa", "flex", "flash"],
                        help="attention kernel when no trace is recorded (auto: flash-attn on CUDA when installed, else sdpa)")


def _add_fam_options(parser: argparse.ArgumentParser) -> None:
    defaults = TOOL_DEFAULTS
    parser.add_argument("--mode", default=defaults.mode, choices=MODES)
    parser.add_argument("--block-size", type=int, default=defaults.block_size, metavar="N")
    parser.add_argument("--fam-len", type=int, default=defaults.fam_len, metavar="N")
    parser.add_argument("--mem-blocks", type=int, default=defaults.mem_blocks, metavar="N")
    _add_sink_option(parser)


def _add_sink_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sink-tokens", type=int, default=TOOL_DEFAULTS.sink_tokens, metavar="S",
                        help="sink mode: the stream's first S tokens stay visible for ever (StreamingLLM; default 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m famviz", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging on stderr")
    parser.add_argument("--version", action="version", version=f"famviz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    stream = commands.add_parser("stream", help="stream a document through the model, block by block")
    stream.add_argument("path", help="document: .txt, .md, .pdf, .html or any UTF-8 text file")
    _add_fam_options(stream)
    _add_model_options(stream)
    stream.add_argument("--max-tokens", type=int, default=None, metavar="N", help="truncate the document to N tokens")
    stream.add_argument("--trace", default=None, metavar="OUT",
                        help="record the trace and save it to OUT (.npz); without it only the per-token NLL is kept")
    stream.add_argument("--no-trace", action="store_true", help="record no trace even with --trace (fastest)")
    stream.add_argument("--channels", default=None, metavar="PATTERNS",
                        help="comma-separated trace channel patterns to record, e.g. 'block.*.share,tokens.nll'")
    stream.add_argument("--json", action="store_true", help="print one JSON object with the results")
    stream.set_defaults(handler=run_stream)

    from famviz.viz.export import FIGURES, FORMATS, figure_help

    export = commands.add_parser("export", help="write a figure of a saved trace (png, svg, pdf or html; no model)",
                                 description=f"Figures: {figure_help()}.")
    export.add_argument("trace", metavar="TRACE", help="trace file (.npz) from `stream --trace` or the app")
    export.add_argument("--figure", required=True, choices=list(FIGURES), metavar="NAME",
                        help=f"one of: {', '.join(FIGURES)}")
    export.add_argument("--format", default=None, choices=FORMATS, help="default: from --out's suffix")
    export.add_argument("--out", required=True, metavar="PATH", help="file to write")
    export.add_argument("--view", default=None, help="heatmap/heads: block-fam, block-memory, block-block, block-sink or fam-block")
    export.add_argument("--block", type=int, default=None, help="heads: the block to drill into (default: last)")
    export.add_argument("--layer", type=int, default=None, help="heads: the layer to frame")
    export.add_argument("--method", default="PCA", choices=["PCA", "UMAP"], help="trajectory projection")
    export.set_defaults(handler=run_export)

    train = commands.add_parser("train", help="fine-tune the FAM (LoRA + learned FAM prompt) or a BSWA baseline")
    from famviz.training.train import add_train_arguments

    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser(
        "evaluate", help="every check of an adapter (or the untuned conversion): PassKey grid against bswa and full, "
                         "long-document NLL per quarter, in-window loss, FAM norm",
        description="Results go to stdout (a table, or JSON with --json) and, for an adapter, into its training card.")
    from famviz.training.evaluation import add_evaluate_arguments, run_evaluate

    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    passkey = commands.add_parser("passkey", help="PassKey retrieval: length × depth sweeps, or a live retention curve",
                                  description="Hide a pass key in filler (docs/algorithm.md §7) or your own document and ask "
                                              "for it at the end; answers are scored by their first integer.")
    passkey.add_argument("--modes", default="fam,bswa,full", metavar="LIST",
                         help="comma-separated modes; MODE:N sets mode's memory blocks, e.g. fam:0,bswa:0,bswa:1,full")
    passkey.add_argument("--lengths", default="1000,2000,4000", metavar="LIST", help="prompt lengths in tokens")
    passkey.add_argument("--depths", default="0,0.5,1", metavar="LIST",
                         help="key depths from 0 (right after the instruction) to 1 (right before the question)")
    passkey.add_argument("--trials", type=int, default=10, metavar="N", help="keys per cell")
    passkey.add_argument("--seed", type=int, default=0, metavar="S")
    defaults = TOOL_DEFAULTS
    passkey.add_argument("--block-size", type=int, default=defaults.block_size, metavar="N")
    passkey.add_argument("--fam-len", type=int, default=defaults.fam_len, metavar="N")
    passkey.add_argument("--mem-blocks", type=int, default=defaults.mem_blocks, metavar="N",
                         help="memory blocks for modes given without :N")
    _add_sink_option(passkey)
    _add_model_options(passkey)
    passkey.add_argument("--document", default=None, metavar="PATH",
                         help="hide the key in this document (cut to each length) instead of the standard filler")
    passkey.add_argument("--retention", action="store_true",
                         help="instead of a sweep: stream one prompt per cell and probe the memory as it goes")
    passkey.add_argument("--probe-every", type=int, default=1, metavar="K", help="with --retention: probe every K blocks")
    passkey.add_argument("--json", action="store_true", help="print one JSON object with the results")
    passkey.add_argument("--figure", default=None, metavar="OUT",
                         help="write the accuracy heatmap (or retention curves) to OUT (.png, .svg, .pdf or .html)")
    passkey.set_defaults(handler=run_passkey)

    ablate = commands.add_parser(
        "ablate", help="where the memory keeps the key: FAM ablation and patching, per layer and block",
        description="Replace the FAM of one layer (or all) after a block by the initial FAM (ablate), by the FAM of "
                    "the same prompt with another key (patch), or patch the clean FAM into that corrupted run "
                    "(write-time), and measure log p(target) at the question.")
    ablate.add_argument("--method", default="ablate", metavar="NAME", help="ablate, patch or write-time")
    ablate.add_argument("--length", type=int, default=1024, metavar="N", help="PassKey prompt length in tokens")
    ablate.add_argument("--depth", type=float, default=0.0, metavar="D", help="key depth, 0…1")
    ablate.add_argument("--trials", type=int, default=4, metavar="N", help="keys to average over")
    ablate.add_argument("--seed", type=int, default=0, metavar="S")
    ablate.add_argument("--blocks", default=None, metavar="LIST",
                        help="after which blocks the FAM is replaced: a list or 'all' (default: the last; "
                             "write-time: all)")
    ablate.add_argument("--layers", default=None, metavar="LIST", help="layers to intervene on one at a time "
                                                                       "(default: all; a row 'all' does every layer at once)")
    ablate.add_argument("--head-layer", type=int, default=None, metavar="L",
                        help="also replace one KV head group at a time of layer L (at the last block)")
    ablate.add_argument("--text", default=None, metavar="PATH",
                        help="instead of a PassKey prompt: this document as the prompt (with --target)")
    ablate.add_argument("--target", default=None, metavar="STRING", help="with --text: the continuation to score")
    ablate.add_argument("--block-size", type=int, default=TOOL_DEFAULTS.block_size, metavar="N")
    ablate.add_argument("--fam-len", type=int, default=TOOL_DEFAULTS.fam_len, metavar="N")
    ablate.add_argument("--mem-blocks", type=int, default=0, metavar="N", help="default 0 (the FAM alone carries the key)")
    _add_model_options(ablate)
    ablate.add_argument("--json", action="store_true", help="print one JSON object with the results")
    ablate.add_argument("--figure", default=None, metavar="OUT", help="the layer × block heatmap (.png, .svg, .pdf, .html)")
    ablate.set_defaults(handler=run_ablate)

    bench = commands.add_parser("bench", help="speed and memory figures of streaming, measured side by side")
    bench.add_argument("--quick", action="store_true", help="smaller documents (a few minutes)")
    bench.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--dtype", default="bfloat16", choices=["auto", "bfloat16", "float32"])
    bench.add_argument("--model", default=None, help="Hugging Face model id or local path (default: bundled SmolLM2-135M)")
    bench.add_argument("--train", action="store_true",
                       help="instead: training tok/s of the shipped recipe against the fam inference stream's tok/s")
    bench.add_argument("--recipe", metavar="ADAPTER_DIR", default=None,
                       help="with --train: the run whose train_config.json is the recipe (default: the shipped adapter)")
    bench.set_defaults(handler=run_bench)
    return parser


def run_passkey(args) -> int:
    from famviz.probes import passkey as pk

    try:
        specs = [pk.ModeSpec.parse(part, args.mem_blocks) for part in args.modes.split(",") if part.strip()]
        base = check_limits(FamConfig(mode="fam", block_size=args.block_size, fam_len=args.fam_len,
                                      mem_blocks=args.mem_blocks, sink_tokens=args.sink_tokens))
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
    figure_out = check_output_path(args.figure) if args.figure else None
    if figure_out and os.path.splitext(figure_out)[1].lower() not in (".png", ".svg", ".pdf", ".html"):
        raise FamvizError("--figure must end in .png, .svg, .pdf or .html")
    text = None
    if args.document:
        from famviz.io.documents import read_document

        text = read_document(args.document)
    loaded, fam_prompt = load_for_cli(args, base)
    backend = resolve_backend(args.backend, loaded.device)
    # Notes about the runs the adapter is used in (a sweep's fam columns), not about the --mem-blocks default.
    tuned = [pk.sweep_config(base, spec) for spec in specs if spec.mode == "fam"]
    print_geometry_notes(args, *(tuned or [base]))
    config = {"block_size": args.block_size, "fam_len": args.fam_len, "sink_tokens": args.sink_tokens,
              "modes": [s.label for s in specs],
              "lengths": lengths, "depths": depths, "trials": args.trials, "seed": args.seed, "model": loaded.name,
              "adapter": args.adapter, "document": args.document, "device": str(loaded.device),
              "dtype": str(loaded.dtype).replace("torch.", "")}
    started = time.perf_counter()
    if args.retention:
        output, figure = _passkey_retention(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend)
    else:
        output, figure = _passkey_sweep(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend)
    output["config"] = config
    output["seconds"] = round(time.perf_counter() - started, 2)
    if figure_out:
        from famviz.viz.export import write_figure

        caption = (f"{loaded.name}; block {args.block_size}, fam_len {args.fam_len}; {args.trials} trials per cell, "
                   f"seed {args.seed}")
        output["figure"] = str(write_figure(figure, figure_out, caption=caption, metadata=config, size=(1100, 420)))
    if args.json:
        print(json.dumps(output))
    elif not args.retention:
        print(f"{'mode':>14}  {'length':>7}  {'depth':>5}  {'trials':>6}  {'accuracy':>8}  {'mean log p(key)':>15}")
        for cell in output["results"]:
            print(f"{cell['label']:>14}  {cell['length']:>7}  {cell['depth']:>5g}  {cell['trials']:>6}  "
                  f"{cell['accuracy']:>8.1%}  {cell['mean_key_logprob']:>15.2f}")
    return 0


def run_ablate(args) -> int:
    from famviz.probes import ablation as ab

    ab.check_method(args.method)
    config = check_limits(FamConfig(mode="fam", block_size=args.block_size, fam_len=args.fam_len,
                                    mem_blocks=args.mem_blocks))
    if args.trials < 1 or args.length < 1 or not 0 <= args.depth <= 1:
        raise FamvizError("--trials and --length must be at least 1 and --depth between 0 and 1")
    if (args.text is None) != (args.target is None):
        raise FamvizError("--text and --target go together")
    if args.text is not None and args.method != "ablate":
        raise FamvizError(f"--method {args.method} needs a corrupted prompt: use it with PassKey prompts (no --text)")
    blocks = None if args.blocks in (None, "all") else number_list(args.blocks, int, "--blocks")
    layers = None if args.layers is None else number_list(args.layers, int, "--layers")
    figure_out = check_output_path(args.figure) if args.figure else None
    if figure_out and os.path.splitext(figure_out)[1].lower() not in (".png", ".svg", ".pdf", ".html"):
        raise FamvizError("--figure must end in .png, .svg, .pdf or .html")
    text = None
    if args.text is not None:
        from famviz.io.documents import read_document

        text = read_document(args.text)
    loaded, fam_prompt = load_for_cli(args, config)
    print_geometry_notes(args, config)
    from famviz.core.fam_model import FamModel

    fam_model = FamModel(loaded, config, fam_prompt=fam_prompt)
    try:
        if text is not None:
            cases = [(ab.text_case(loaded.tokenizer, text, args.target, config.block_size), None)]
        else:
            cases = ab.passkey_cases(loaded.tokenizer, config.block_size, args.length, args.depth, args.trials,
                                     args.seed)
    except ValueError as exc:  # e.g. a length shorter than the prompt without filler
        raise FamvizError(str(exc)) from None
    n_blocks = cases[0][0].blocks(config.block_size)
    if args.blocks == "all":
        blocks = list(range(1, n_blocks + 1))
    started = time.perf_counter()
    from tqdm import tqdm

    with tqdm(desc=f"{args.method}", unit="intervention", file=sys.stderr, dynamic_ncols=True,
              disable=args.json and not sys.stderr.isatty()) as progress:
        result = ab.run_interventions(fam_model, cases, args.method, blocks=blocks, layers=layers,
                                      head_layer=args.head_layer, on_update=lambda _: progress.update(1))
    result.config = {"model": loaded.name, "adapter": args.adapter, "length": args.length, "depth": args.depth,
                     "seed": args.seed, "text": args.text, "target": args.target, **config.to_dict(),
                     "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device)}
    output = result.to_dict()
    output["seconds"] = round(time.perf_counter() - started, 2)
    if figure_out:
        from famviz.viz.export import write_figure
        from famviz.viz.passkey_figures import intervention_heatmap

        caption = describe_run(loaded.name, args.adapter, config, f"{result.trials} trials, seed {args.seed}")
        output["figure"] = str(write_figure(intervention_heatmap(output), figure_out, caption=caption,
                                            metadata=result.config, size=(1100, 700)))
    if args.json:
        print(json.dumps(output))
    else:
        print(f"log p(target), mean over {result.trials} trials: " +
              ", ".join(f"{k} {v:.2f}" for k, v in result.values.items()))
        print(f"Δ log p against the {result.reference} run (rows: layers; columns: FAM replaced after block …)")
        print("layer  " + "".join(f"{b:>8}" for b in result.blocks))
        for layer, row in zip(result.layers, result.delta):
            print(f"{str(layer):>5}  " + "".join(f"{v:>+8.2f}" for v in row))
        if result.head_delta is not None:
            print(f"layer {result.head_layer}, KV head groups: " + "  ".join(f"{v:+.2f}" for v in result.head_delta))
    return 0


def describe_run(model: str, adapter: str | None, config: FamConfig, extra: str) -> str:
    from famviz.io.models import describe_model

    return f"{describe_model(model, adapter)}; block {config.block_size}, FAM {config.fam_len}, " \
           f"memory blocks {config.mem_blocks}; {extra}"


def _passkey_sweep(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend):
    from tqdm import tqdm

    from famviz.core.fam_model import FamModel
    from famviz.probes import passkey as pk
    from famviz.viz.passkey_figures import passkey_heatmap

    documents = {(n, d): pk.trial_documents(loaded.tokenizer, n, d, args.trials, args.seed, text)
                 for n in lengths for d in depths}
    cells = []
    with tqdm(total=len(specs) * len(documents) * args.trials, unit="trial", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for spec in specs:
            fam_model = FamModel(loaded, pk.sweep_config(base, spec), backend=backend,
                                 fam_prompt=fam_prompt if spec.mode == "fam" else None)
            for (length, depth), docs in documents.items():
                bar.set_description(f"{spec.label} {length} tok depth {depth:g}")
                cell = pk.run_cell(fam_model, docs, spec, on_trial=lambda _: bar.update(1))
                cells.append(cell)
                # One line per cell on stderr, also with --json: partial results survive an interruption.
                bar.write(f"{cell.label:>14}  length {cell.length:>6}  depth {cell.depth:4g}  "
                          f"accuracy {cell.accuracy:6.1%}  mean log p(key) {cell.mean_key_logprob:8.2f}  "
                          f"({cell.seconds:.1f} s)", file=sys.stderr)
    return {"results": [cell.summary() for cell in cells]}, passkey_heatmap(cells)


def _passkey_retention(loaded, specs, base, lengths, depths, args, text, fam_prompt, backend):
    from famviz.core.fam_model import FamModel
    from famviz.probes import passkey as pk
    from famviz.viz.passkey_figures import retention_figure

    curves, last = [], None
    for spec in specs:
        fam_model = FamModel(loaded, pk.sweep_config(base, spec), backend=backend,
                             fam_prompt=fam_prompt if spec.mode == "fam" else None)
        for length in lengths:
            for depth in depths:
                document = pk.trial_documents(loaded.tokenizer, length, depth, 1, args.seed, text)[0]

                def show(point, label=spec.label):
                    if not args.json:
                        print(f"{label:>14}  block {point.block:>4}  blocks since key {point.blocks_since_key:>4}  "
                              f"{'retrieved' if point.correct else 'lost     '}  answer {point.predicted}  "
                              f"log p(key) {point.key_logprob:8.2f}", flush=True)

                points = pk.retention_curve(fam_model, document, args.probe_every, on_point=show)
                last = (points, document.key)
                curves.append({"mode": spec.mode, "mem_blocks": spec.mem_blocks, "label": spec.label, "length": length,
                               "depth": depth, "key": document.key, "points": [vars(p) for p in points]})
    return {"retention": curves}, retention_figure(*last)


def run_export(args) -> int:
    from famviz.viz.export import export_trace_file

    path = export_trace_file(args.trace, args.figure, args.format, args.out, view=args.view, block=args.block,
                             layer=args.layer, method=args.method)
    print(path)
    return 0


def run_bench(args) -> int:
    from famviz.bench import FULL, QUICK, format_table
    from famviz.bench import run_bench as bench_main
    from famviz.io.models import load_model

    if args.train:
        from famviz.bench import TRAIN_QUICK, TrainBenchSizes, format_train_table, run_train_bench

        figures = run_train_bench(args.model, args.device, args.dtype, TRAIN_QUICK if args.quick else TrainBenchSizes(),
                                  recipe_dir=args.recipe, progress=lambda message: log.warning("bench: %s", message))
        print(json.dumps(figures) if args.json else format_train_table(figures))
        return 0
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    figures = bench_main(loaded, QUICK if args.quick else FULL, progress=lambda message: log.warning("bench: %s", message))
    print(json.dumps(figures) if args.json else format_table(figures))
    return 0


def run_train(args) -> int:
    from famviz.training.train import run_train as train_main

    return train_main(args)


def main(argv: list[str] | None = None) -> int:
    # famviz never downloads at run time: hub ids resolve from the local HF cache only
    # (set HF_HUB_OFFLINE=0 to allow downloads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(message)s")
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


# -- stream ---------------------------------------------------------------------------------------
def run_stream(args) -> int:
    from famviz.io.documents import head_bytes_for, read_document_start

    config = check_limits(FamConfig(mode=args.mode, block_size=args.block_size, fam_len=args.fam_len,
                                    mem_blocks=args.mem_blocks, sink_tokens=args.sink_tokens))
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
    result = stream_with_progress(loaded, config, ids, fam_prompt=fam_prompt, record=record, channels=channels,
                                  backend=resolve_backend(args.backend, loaded.device))
    trace_path = None
    if result.trace is not None:
        result.trace.text = text
        result.trace.offsets = list(offsets)
        if trace_out:
            try:
                trace_path = str(result.trace.save(trace_out))
            except OSError as exc:
                raise FamvizError(f"cannot write the trace to {trace_out}: {exc.strerror or exc}") from None
    summary = {
        "mode": config.mode, "tokens": result.tokens, "blocks": result.blocks, "block_size": config.block_size,
        "fam_len": config.active_fam_len, "mem_blocks": config.mem_blocks, "sink_tokens": config.active_sink_tokens,
        "nll_mean": result.nll_mean,
        "seconds": round(result.seconds, 4), "tokens_per_s": round(result.tokens_per_s, 2),
        "peak_rss_mb": round(max(load_peak_mb, peak_rss_mb()), 1),
        "stream_peak_rss_mb": round(window_peak_rss_mb(), 1) if can_window else None, "state_bytes": result.state_bytes,
        "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""), "model": loaded.name,
        "adapter": loaded.adapter, "trace": trace_path, "trace_bytes": result.trace.nbytes() if result.trace is not None else 0,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>13}: {value}")
    return 0


def check_output_path(path: str) -> str:
    """Refuse an unwritable output path before any work is done."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise FamvizError(f"{path} is a directory; give a file name such as {target / 'trace.npz'}")
    if not target.parent.is_dir():
        raise FamvizError(f"cannot write {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise FamvizError(f"cannot write {path}: folder {target.parent} is not writable")
    return str(target)


def load_for_cli(args, config: FamConfig):
    """The model and (with --adapter) the trained FAM prompt, with adapter LoRA merged."""
    from famviz.io.models import load_model

    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    fam_prompt = None
    if args.adapter:
        from famviz.io.adapters import apply_adapter

        fam_prompt = apply_adapter(args.adapter, loaded, config)
    log.info("model %s loaded in %.1f s on %s (%s)", loaded.name, time.perf_counter() - started, loaded.device,
             loaded.dtype)
    return loaded, fam_prompt


def print_geometry_notes(args, *configs: FamConfig) -> None:
    """On stderr, once the run is about to start: settings that are allowed but probably not meant (a block
    shorter than the FAM), and how the runs' ``configs`` differ from what ``--adapter`` was trained with."""
    from famviz.io.adapters import read_adapter, run_notes

    adapter = read_adapter(args.adapter) if args.adapter else None
    notes = [note for config in configs for note in run_notes(config, adapter)]
    for note in dict.fromkeys(notes):
        print(f"famviz: note: {note}", file=sys.stderr)


def resolve_backend(name: str, device) -> str:
    from famviz.core.attention import available_backends

    available = available_backends(device)
    if name == "auto":
        return "flash" if "flash" in available else "sdpa"
    if name not in available:
        raise FamvizError(f"attention back end {name!r} is not available on {device}; available: {', '.join(available)}")
    return name


def stream_with_progress(loaded, config: FamConfig, ids, **kwargs):
    """Run a stream with a progress bar on stderr (shown for documents of more than one block)."""
    from tqdm import tqdm

    from famviz.core.engine import Stream

    n_blocks = -(-len(ids) // config.block_size)
    with tqdm(total=len(ids), unit="tok", file=sys.stderr, disable=n_blocks < 2, dynamic_ncols=True,
              desc=f"{config.mode}") as bar:
        stream = Stream(loaded, config, on_block=lambda block: bar.update(len(block.token_ids)), **kwargs)
        return stream.run(ids)

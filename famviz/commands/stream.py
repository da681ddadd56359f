"""``famviz stream PATH``: stream a document through the model block by block; the summary (and the trace)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.commands.options import add_fam_options, add_json_option, add_model_options
from famviz.errors import FamvizError

if TYPE_CHECKING:
    import argparse

    from famviz.core.config import FamConfig
    from famviz.core.engine import StreamResult
    from famviz.core.model import LoadedModel


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("stream", help="stream a document through the model, block by block")
    parser.add_argument("path", help="document: .txt, .md, .pdf, .html or any UTF-8 text file")
    add_fam_options(parser)
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N", help="truncate the document to N tokens")
    parser.add_argument(
        "--trace",
        default=None,
        metavar="OUT",
        help="record the trace and save it to OUT (.npz); without it only the per-token NLL is kept",
    )
    parser.add_argument("--no-trace", action="store_true", help="record no trace even with --trace (fastest)")
    parser.add_argument(
        "--channels",
        default=None,
        metavar="PATTERNS",
        help="comma-separated trace channel patterns to record, e.g. 'block.*.share,tokens.nll'",
    )
    parser.add_argument(
        "--lens",
        default=None,
        metavar="LAYERS",
        help="also record the memory lens (each FAM slot decoded through the final norm and unembedding) at "
        "these layers, e.g. '29' or '-1,-2' (negative: from the top); off by default: each layer costs a "
        "vocabulary-sized product per slot and block",
    )
    parser.add_argument(
        "--lens-top-k", type=int, default=5, metavar="K", help="tokens kept per FAM slot by --lens (default 5)"
    )
    parser.add_argument(
        "--slots",
        default=None,
        metavar="LAYERS",
        help="also record the per-slot views at these layers: each FAM slot's norm, update and attention "
        "received per block, and its attention on each token",
    )
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from famviz.commands.common import load_for_cli, print_geometry_notes, resolve_backend, run_config
    from famviz.io.documents import head_bytes_for, read_document_start
    from famviz.io.paths import check_output_path

    config = run_config(args, args.mode)
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise FamvizError(f"--max-tokens must be positive, got {args.max_tokens}")
    trace_out = check_output_path(args.trace) if args.trace else None
    document = read_document_start(args.path, head_bytes_for(args.max_tokens))
    if document.cut:  # a large text file: only the part --max-tokens can use was read
        print(f"famviz: note: read {document.cut} (enough for --max-tokens {args.max_tokens:,})", file=sys.stderr)
    text = document.text
    loaded, fam_prompt = load_for_cli(args, config)
    channels = _channels(args, loaded.config.num_hidden_layers, config)
    from famviz.core.trace import ChannelSelection

    ChannelSelection(channels, loaded.config.num_hidden_layers, fam=config.active_fam_len > 0)  # fail before streaming
    print_geometry_notes(args.adapter, config)
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
        lens_top_k=args.lens_top_k,
    )
    trace_path = None
    if result.trace is not None and trace_out:
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


OPT_IN_OPTIONS = {"lens": ("lens",), "slots": ("slot_norm", "slot_update", "slot_received", "slot_read")}


def _channels(args: argparse.Namespace, n_layers: int, config: FamConfig) -> list[str] | None:
    """The trace channel patterns of --channels (None: all), --lens's and --slots's layers."""
    channels = args.channels.split(",") if args.channels else None
    if args.lens_top_k < 1:
        raise FamvizError(f"--lens-top-k must be at least 1, got {args.lens_top_k}")
    added = []
    for option, kinds in OPT_IN_OPTIONS.items():
        text = getattr(args, option)
        if text is None:
            continue
        from famviz.viz.inspector import parse_layers

        if not config.active_fam_len:
            raise FamvizError(f"--{option} needs FAM slots: mode {config.mode} has none")
        try:
            layers = parse_layers(text, n_layers, f"--{option} layers", default=[], most=n_layers)
        except ValueError as exc:
            raise FamvizError(str(exc)) from None
        added += [f"fam.{layer}.{kind}" for layer in layers for kind in kinds]
    return [*(channels or ["*"]), *added] if added else channels


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

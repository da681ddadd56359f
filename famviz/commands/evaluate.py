"""``famviz evaluate [ADAPTER_DIR]``: every check of an adapter (or the untuned conversion) in one command —
the options and their checked plan (``EvaluationPlan``), a progress bar per part, the tables or JSON, and
with --write-card the results in the adapter's training card. The checks are ``famviz.training.evaluation``."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.commands.options import MODEL_HELP, add_device_options, add_json_option
from famviz.core.config import FAM_NORMS, LIMITS, TOOL_DEFAULTS, FamConfig, number_list  # light: no torch
from famviz.errors import ConfigError, FamvizError
from famviz.training.evaluation_plan import (
    CORPUS_DOCUMENTS,
    FULL,
    MIN_LONG_TOKENS,
    MIN_PASSKEY_LENGTH,
    QUICK,
    SIZED_OPTIONS,
    EvaluationPlan,
    Sizes,
)

if TYPE_CHECKING:
    import argparse

    from tqdm import tqdm

    from famviz.io.adapters import Adapter

log = logging.getLogger("famviz")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="every check of an adapter (or the untuned conversion): PassKey grid against bswa and full, "
        "long-document NLL per quarter, in-window loss, FAM norm",
        description="Results go to stdout (a table, or JSON with --json); with --write-card also into the "
        "adapter's training card. --quick: a smoke check in about 1.5 minutes on a 2-core CPU.",
    )
    add_evaluate_options(parser)
    parser.set_defaults(handler=run)


def sizes_for(args: argparse.Namespace, config: FamConfig) -> Sizes:
    """The sizes of this run: --quick's or the full check's, with every option given explicitly kept."""
    chosen = QUICK if getattr(args, "quick", False) else FULL
    if chosen.lengths is None:
        chosen = dataclasses.replace(chosen, lengths=str((config.mem_blocks + 2) * config.block_size))
    given = {name: getattr(args, name) for name in SIZED_OPTIONS if getattr(args, name, None) is not None}
    if args.document and chosen.long_documents is not None:
        given["long_documents"] = None  # documents named explicitly are all read
    return dataclasses.replace(chosen, **given)


def _limits_help(name: str) -> str:
    low, high = LIMITS[name]
    return f"{low:,}…{high:,}"


def add_evaluate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter",
        nargs="?",
        default=None,
        metavar="ADAPTER_DIR",
        help="the adapter to evaluate (its training card is left unchanged unless --write-card); "
        "none: the untuned conversion",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke check, about 1.5 minutes on a 2-core CPU, instead of the full one (an hour or more there): "
        f"modes {QUICK.modes}, PassKey at (memory blocks + 2) blocks (512 tokens for block 256, no memory), "
        f"depth {QUICK.depths}, {QUICK.trials} keys per cell, {QUICK.windows} in-window windows, one long "
        f"document (GPL-3, or the first of the corpus's held-out split) of {QUICK.long_tokens:,} tokens, FAM "
        f"norm after {QUICK.norm_after_blocks} blocks; options given explicitly still apply. Noisy: to look "
        "at, not to report",
    )
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="also record the results in ADAPTER_DIR's training card (training_card.json and TRAINING_CARD.md); "
        "default: they are only printed",
    )
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_device_options(parser)
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads, at least 1")
    _add_geometry_options(parser)
    _add_passkey_options(parser)
    _add_document_options(parser)
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=TOOL_DEFAULTS.sink_tokens,
        metavar="S",
        help="tokens the sink baselines keep for ever (PassKey mode sink, the long documents' untuned sink row), "
        f"{_limits_help('sink_tokens')}; default {TOOL_DEFAULTS.sink_tokens}",
    )
    add_json_option(parser, "print one JSON object instead of tables")
    parser.add_argument(
        "--figure", default=None, metavar="OUT", help="the PassKey grid as a heatmap (.png, .svg, .pdf, .html)"
    )


def _add_geometry_options(parser: argparse.ArgumentParser) -> None:
    """The evaluated run's geometry (default: the adapter's)."""
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help=f"{_limits_help('block_size')}; default: the adapter's (else {TOOL_DEFAULTS.block_size})",
    )
    parser.add_argument(
        "--fam-len",
        type=int,
        default=None,
        metavar="N",
        help=f"{_limits_help('fam_len')}; default: the adapter's (else {TOOL_DEFAULTS.fam_len})",
    )
    parser.add_argument(
        "--fam-norm",
        choices=FAM_NORMS,
        default=None,
        help="grow (the paper's) or keep (each FAM slot rescaled to its norm before the update); "
        "default: the adapter's, else grow",
    )
    parser.add_argument(
        "--mem-blocks",
        type=int,
        default=None,
        metavar="N",
        help=f"{_limits_help('mem_blocks')}; default: the adapter's (else 0, the paper's PassKey setting)",
    )


def _add_passkey_options(parser: argparse.ArgumentParser) -> None:
    """The PassKey grid: modes, lengths, depths, keys."""
    parser.add_argument(
        "--modes",
        default=None,
        metavar="LIST",
        help="PassKey modes, all on the same keys; MODE:N sets memory blocks, N "
        f"{_limits_help('mem_blocks')} (default: --mem-blocks); default {FULL.modes}, --quick {QUICK.modes}",
    )
    parser.add_argument(
        "--lengths",
        default=None,
        metavar="LIST",
        help=f"PassKey prompt lengths in tokens, each at least {MIN_PASSKEY_LENGTH} (no upper limit: time grows "
        f"with length); default {FULL.lengths}, --quick (memory blocks + 2) × block size",
    )
    parser.add_argument(
        "--depths", default=None, metavar="LIST", help=f"PassKey key depths, each 0…1; default {FULL.depths}"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help=f"PassKey keys per cell, at least 1; default {FULL.trials}, --quick {QUICK.trials}",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="PassKey keys' seed, any integer; default 0")
    parser.add_argument("--skip-passkey", action="store_true", help="only the loss checks")


def _add_document_options(parser: argparse.ArgumentParser) -> None:
    """The long documents and the FAM norm checks."""
    parser.add_argument(
        "--document",
        action="append",
        default=None,
        metavar="PATH",
        help=f"a held-out long document of at least {MIN_LONG_TOKENS:,} tokens (repeatable; default: GPL-3 and "
        "pydoc text)",
    )
    parser.add_argument(
        "--corpus",
        action="append",
        default=None,
        metavar="PATH",
        help=f"long documents from this corpus's held-out split, the first {CORPUS_DOCUMENTS} (--quick: 1) of "
        f"at least {MIN_LONG_TOKENS:,} tokens (as `train --corpus`; default for an adapter trained on a corpus, "
        "unless --document is given)",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens of each long document: 0 (no long-document check) or at least {MIN_LONG_TOKENS:,} "
        f"(a shorter document is used whole); default {FULL.long_tokens:,}, --quick {QUICK.long_tokens:,}",
    )
    parser.add_argument(
        "--norm-after-blocks",
        default=None,
        metavar="LIST",
        help="the evaluated FAM's norm after these blocks, each at least 1 (a long document is streamed again, "
        f"repeated, past its end; the tuned stream's time grows with the largest); default {FULL.norm_after_blocks}, "
        f"--quick {QUICK.norm_after_blocks}",
    )


def _geometry(args: argparse.Namespace, adapter: Adapter | None) -> FamConfig:
    from famviz.core.config import TOOL_DEFAULTS, check_limit, check_limits
    from famviz.io.adapters import GEOMETRY_SETTINGS, run_geometry

    # The fam config carries the sink baselines' count (--sink-tokens, always given), which check_limits skips
    # outside sink mode.
    check_limit("sink_tokens", getattr(args, "sink_tokens", TOOL_DEFAULTS.sink_tokens))
    given = {name: getattr(args, name, None) for name in GEOMETRY_SETTINGS}
    # Without an adapter: no memory blocks (the FAM alone is what is evaluated).
    untuned_default = dataclasses.replace(TOOL_DEFAULTS, mem_blocks=0)
    return check_limits(run_geometry(adapter, "fam", untuned_default, **given))


def _check_sizes(sizes: Sizes, lengths: list[int], depths: list[float], norm_after: list[int]) -> None:
    if any(n < MIN_PASSKEY_LENGTH for n in lengths):
        raise ConfigError(f"--lengths: PassKey lengths must be at least {MIN_PASSKEY_LENGTH} tokens, got {lengths}")
    if any(not 0 <= d <= 1 for d in depths):
        raise ConfigError(f"--depths: key depths must be within 0…1, got {depths}")
    if sizes.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {sizes.trials}")
    if sizes.long_tokens and sizes.long_tokens < MIN_LONG_TOKENS:
        raise ConfigError(f"--long-tokens must be 0 or at least {MIN_LONG_TOKENS}, got {sizes.long_tokens}")
    if any(n < 1 for n in norm_after):
        raise ConfigError(f"--norm-after-blocks must be block counts of at least 1, got {norm_after}")


def plan_evaluation(args: argparse.Namespace) -> EvaluationPlan:
    """The checked plan, or a FamvizError with one clear message (bad numbers, modes, files, adapter)."""
    from famviz.core.config import check_limit
    from famviz.io.adapters import read_adapter
    from famviz.io.paths import check_figure_path
    from famviz.probes import passkey as pk

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    adapter = read_adapter(args.adapter) if args.adapter else None
    if args.write_card and adapter is None:
        raise ConfigError("--write-card records the results in an adapter's training card: give ADAPTER_DIR")
    config = _geometry(args, adapter)
    sizes = sizes_for(args, config)
    lengths = number_list(sizes.lengths, int, "--lengths")
    depths = number_list(sizes.depths, float, "--depths")
    norm_after = number_list(sizes.norm_after_blocks, int, "--norm-after-blocks")
    _check_sizes(sizes, lengths, depths, norm_after)
    try:
        specs = [pk.ModeSpec.parse(m, config.mem_blocks) for m in sizes.modes.split(",") if m.strip()]
    except ValueError as exc:
        raise ConfigError(f"--modes: {exc}") from None
    for spec in specs:
        check_limit("mem_blocks", spec.mem_blocks)
    corpus = _long_document_corpus(args, sizes, adapter)
    figure = check_figure_path(args.figure)
    if figure and args.skip_passkey:
        raise ConfigError("--figure draws the PassKey grid: leave out --skip-passkey")
    return EvaluationPlan(
        adapter,
        config,
        lengths,
        depths,
        [] if args.skip_passkey else specs,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        documents=args.document,
        corpus=corpus,
        figure=figure,
        sizes=sizes,
        norm_after=tuple(norm_after),
        quick=args.quick,
        write_card=args.write_card,
    )


def _long_document_corpus(args: argparse.Namespace, sizes: Sizes, adapter: Adapter | None) -> list[str] | None:
    """The corpus whose held-out documents the long-document check reads (None: the documents given, else
    GPL-3 and pydoc); documents and corpora that cannot be read fail now, not after the model has loaded."""
    from famviz.io.documents import read_document
    from famviz.training.evaluation import trained_corpus

    for path in args.document or []:
        read_document(path)
    if args.corpus and args.document:
        raise ConfigError("give --document or --corpus, not both")
    if not sizes.long_tokens or args.document:
        return None
    if args.corpus:
        from famviz.io.corpus import Corpus

        Corpus(args.corpus)
        return args.corpus
    corpus = trained_corpus(adapter.directory) if adapter is not None else None  # the adapter's own text
    if corpus and not all(Path(p).exists() for p in corpus):
        log.warning(
            "the corpus the adapter was trained on (%s) is not here: long documents are GPL-3 and pydoc",
            ", ".join(corpus),
        )
        return None
    return corpus


class PartProgress:
    """One progress bar per part of the evaluation, named with its place and what it runs ("evaluate 3/4 long
    documents: 1 × 5 streams"), each counting its own work (tokens, mostly), so that the rate and the time
    left it shows are that part's own, not an average over unlike parts. Each finished bar stays on screen
    with the time its part took."""

    def __init__(self, parts: list[str], enabled: bool = True):
        self.parts, self.enabled = parts, enabled
        self.bar: tqdm | None = None

    def start(self, part: str, detail: str, total: int, unit: str = "tok") -> Callable[[int], None]:
        """A bar for ``part`` (closing the previous one); returns what to call with each step's count."""
        self.close()
        if not self.enabled:
            return lambda count: None
        from tqdm import tqdm

        place = f"{self.parts.index(part) + 1}/{len(self.parts)}"
        self.bar = tqdm(
            total=total,
            desc=f"evaluate {place} {part}: {detail}",
            unit=unit,
            unit_scale=unit == "tok",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluation_table(result: dict) -> str:
    """The evaluation as plain-text tables for a terminal."""
    from famviz.io.adapters import LONG_DOCUMENT_MODELS

    lines = [
        f"famviz evaluate · {result.get('label')} · {result.get('config')} · {result.get('dtype')}"
        + (" · QUICK CHECK (--quick: few keys, one short document; noisy)" if result.get("quick") else "")
        + (" · INTERRUPTED: partial results" if result.get("interrupted") else "")
    ]
    nll = result.get("in_window_nll")
    if nll:
        lines += [
            "",
            f"In one window ({nll['windows']} windows of {nll['window_tokens']} tokens of {nll['text']}):",
            f"  evaluated {nll['tuned']:.4f}   untuned same mode {nll['untuned_same_mode']:.4f}   "
            f"untuned full attention {nll['untuned_full_attention']:.4f}   ({nll['relative_change']:+.1%} vs full)",
        ]
    width = max(len(label) for _, label in LONG_DOCUMENT_MODELS)
    for row in result.get("long_documents") or []:
        lines += ["", f"Long document {row['document']} ({row['tokens']:,} tokens): mean NLL [quarters]"]
        for key, label in LONG_DOCUMENT_MODELS:
            if key not in row:
                continue
            part = row[key]
            lines.append(
                f"  {label:<{width}} {part['nll']:.3f}  [" + " ".join(f"{q:.3f}" for q in part["nll_quarters"]) + "]"
            )
        norms = row["tuned"].get("fam_norm_after_blocks") or {}
        same = f", ÷ same weights in bswa {row['tuned_vs_tuned_bswa']:.3f}" if "tuned_vs_tuned_bswa" in row else ""
        lines.append(
            f"  evaluated ÷ untuned bswa {row['tuned_vs_bswa']:.3f}{same}"
            + ("; FAM norm after blocks " + ", ".join(f"{k}: {v:,.0f}" for k, v in norms.items()) if norms else "")
        )
    cells = result.get("passkey") or []
    if cells:
        lines += ["", "PassKey (greedy): retrieved (mean log p(key)), trials per cell in brackets"]
        columns = sorted({(c["length"], c["depth"]) for c in cells})
        lines.append("  " + f"{'mode':<14}" + "".join(f"{f'{n}@{d:g}':>20}" for n, d in columns))
        for label in dict.fromkeys(c["label"] for c in cells):
            by = {(c["length"], c["depth"]): c for c in cells if c["label"] == label}
            row = [
                f"{by[k]['accuracy']:.0%} ({by[k]['mean_key_logprob']:.2f}) [{by[k]['trials']}]" if k in by else "-"
                for k in columns
            ]
            lines.append("  " + f"{label:<14}" + "".join(f"{cell:>20}" for cell in row))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The result to stdout (table, or JSON with --json) and, with --write-card, into the adapter's training
    card; a progress bar per part on stderr, and a line saying where the results went; Ctrl-C keeps and
    reports what was done (exit status 130)."""
    plan = plan_evaluation(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from famviz.training.evaluation import iter_evaluation

    started = time.time()
    status, done = 0, None
    progress = PartProgress(plan.parts)
    try:
        for partial in iter_evaluation(plan, progress.start):
            done = partial
    except KeyboardInterrupt:
        status = 130
    finally:
        progress.close()
    if done is None:  # interrupted while loading: nothing to report
        return status
    result = done.to_dict()
    if status:
        result["interrupted"] = True
    result["seconds"] = round(time.time() - started, 1)
    if plan.write_card:
        record_in_card(plan.adapter.directory, result)
    if plan.figure and result.get("passkey"):
        write_passkey_figure(plan.figure, result, plan.sizes.trials, plan.seed)
    print(json.dumps(result) if args.json else evaluation_table(result))
    print(f"famviz: {where_results_went(plan, result)}", file=sys.stderr)
    return status


def record_in_card(directory: Path, result: dict) -> None:
    """The result into the adapter's training card: the current figures of its geometry, and one entry more
    in the list of evaluations made after each stage."""
    from famviz.io.adapters import read_training_card, write_training_card

    card = read_training_card(directory)
    key = f"{result['config']['mode']}_mem{result['config']['mem_blocks']}_block{result['config']['block_size']}"
    earlier = card.setdefault("evaluation", {}).get(key, {})
    # A run that skipped a part (e.g. --skip-passkey: an empty list) keeps the card's earlier figures for
    # it; every value it did produce replaces the earlier one (0 included), and a complete run is no
    # longer marked interrupted.
    skipped = [k for k, v in result.items() if k in earlier and v in (None, [], {})]
    merged = {**earlier, **{k: v for k, v in result.items() if k not in skipped}}
    if not result.get("interrupted"):
        merged.pop("interrupted", None)
    card["evaluation"][key] = merged
    card.setdefault("stage_evaluations", []).append({"after_step": card.get("steps"), "key": key, **result})
    write_training_card(directory, card)


def write_passkey_figure(path: str, result: dict, trials: int, seed: int) -> None:
    """The PassKey grid's heatmap; a figure that cannot be written is reported, and the results still printed."""
    from famviz.probes.passkey import CellResult
    from famviz.viz.export import write_figure
    from famviz.viz.passkey_figures import passkey_heatmap

    cells = [CellResult(**cell) for cell in result["passkey"]]
    figure = passkey_heatmap(cells, title=f"PassKey retrieval: {result['label']}")
    caption = f"{result['model']}; {trials} trials per cell, seed {seed}, greedy"
    try:
        result["figure"] = str(write_figure(figure, path, caption=caption, size=(1100, 420)))
    except FamvizError as exc:
        log.error("the PassKey figure was not written: %s", exc)
        result["figure_error"] = str(exc)


def where_results_went(plan: EvaluationPlan, result: dict) -> str:
    """One line for stderr: whether the results are in the adapter's card (and the figure's file)."""
    from famviz.io.adapters import CARD_JSON, CARD_MARKDOWN

    if plan.write_card:
        directory = Path(plan.adapter.directory)
        where = f"results recorded in {directory / CARD_JSON} and {directory / CARD_MARKDOWN}"
    elif plan.adapter is not None:
        where = (
            f"results printed only; {plan.adapter.directory}'s training card is unchanged (--write-card records them)"
        )
    else:
        where = "results printed only"
    return where + (f"; PassKey figure in {result['figure']}" if result.get("figure") else "")

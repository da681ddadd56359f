"""Long-document evaluation of a FAM model: next-token loss per quarter of a document, and the FAM's norm.

A memory that only helps on average can still drift: its state grows with every update until, late in a
long document, it hurts. So the loss is reported per quarter of the document (drift shows as a rising last
quarter), and the FAM's norm (mean over layers and slots of each slot's L2 norm) after a few and after
many blocks.

Held-out text: GPL-3 (excluded from training, see ``famviz.training.data.HELD_OUT_TEXT``) and the plain-text
documentation of a fixed list of Python standard-library modules (``pydoc``), which training never reads.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from famviz.core.config import FamConfig, number_list
from famviz.core.fam_model import FamModel
from famviz.errors import ConfigError, FamvizError
from famviz.io.adapters import LONG_DOCUMENT_MODELS

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable

    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

    from famviz.core.engine import BlockResult
    from famviz.io.adapters import Adapter
    from famviz.io.models import LoadedModel

log = logging.getLogger(__name__)

PYDOC_MODULES = (
    "argparse",
    "collections",
    "contextlib",
    "dataclasses",
    "functools",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "re",
    "subprocess",
    "threading",
    "typing",
    "unittest",
)


@dataclass
class HeldOutDocument:
    name: str
    ids: list[int]


def pydoc_text(modules: Iterable[str] = PYDOC_MODULES) -> str:
    """The plain-text ``pydoc`` pages of ``modules``, joined (deterministic for a Python version)."""
    import importlib
    import pydoc

    pages = []
    for name in modules:
        pages.append(pydoc.plain(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)))
    return "\n\n".join(pages)


MIN_LONG_TOKENS = 1024


def held_out_documents(
    tokenizer: PreTrainedTokenizerBase, tokens: int, paths: list[str] | None = None
) -> list[HeldOutDocument]:
    """The first ``tokens`` tokens of each given file, or of GPL-3 (7,658 tokens: used whole) and the pydoc
    text by default. A document shorter than ``MIN_LONG_TOKENS`` is refused: it would check nothing long.
    """
    from famviz.io.documents import read_document
    from famviz.training.data import HELD_OUT_TEXT

    sources = (
        [(Path(p).name, read_document(p)) for p in paths]
        if paths
        else [("GPL-3", HELD_OUT_TEXT.read_text(encoding="utf-8")), ("pydoc", pydoc_text())]
    )
    documents = []
    for name, text in sources:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < MIN_LONG_TOKENS:
            raise ConfigError(
                f"{name} has {len(ids)} tokens, fewer than the {MIN_LONG_TOKENS} a long-document check needs"
            )
        documents.append(HeldOutDocument(name, ids[:tokens]))
    return documents


CORPUS_DOCUMENTS = 2  # held-out documents of a corpus used for the long-document check


def corpus_documents(
    tokenizer: PreTrainedTokenizerBase, tokens: int, corpus_paths: list[str], count: int = CORPUS_DOCUMENTS
) -> list[HeldOutDocument]:
    """The first ``count`` held-out documents of the corpus (``famviz.io.corpus``'s fixed split) with at least
    ``MIN_LONG_TOKENS`` tokens, cut to ``tokens``: text the training never drew from."""
    from famviz.errors import DocumentError
    from famviz.io.corpus import Corpus

    corpus = Corpus(corpus_paths)
    documents = []
    for index in corpus.held_out:
        try:
            text = corpus.text(int(index))
        except (DocumentError, OSError):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= MIN_LONG_TOKENS:
            documents.append(HeldOutDocument(corpus.doc_id(int(index)), ids[:tokens]))
        if len(documents) == count:
            break
    if not documents:
        raise ConfigError(
            f"no held-out document of the corpus ({len(corpus.held_out)} held out) has the "
            f"{MIN_LONG_TOKENS} tokens a long-document check needs"
        )
    return documents


def fam_norm(fam: tuple[torch.Tensor, ...]) -> float:
    """Mean over layers and slots of the FAM slots' L2 norms (batch element 0)."""
    return float(torch.stack([f[0].float().norm(dim=-1).mean() for f in fam]).mean())


@torch.inference_mode()
def long_document_eval(
    fam_model: FamModel, ids: list[int], quarters: int = 4, norm_after: tuple[int, ...] = (4, 64)
) -> dict:
    """Stream ``ids`` from the initial state; mean NLL overall and per quarter, and the FAM norm after the
    blocks in ``norm_after`` (the document is streamed again, repeated, where it has fewer blocks)."""
    from famviz.core.engine import Stream

    fam = bool(fam_model.fam_len and norm_after)
    block = fam_model.config.block_size
    longest = max(norm_after, default=0) * block
    # One stream: the document, repeated where the norm is asked after more blocks than it has (causal, so
    # the document's own losses are those of streaming it alone).
    streamed = (ids * (longest // len(ids) + 1))[: max(len(ids), longest)] if fam else ids
    norms: dict[str, float] = {}
    stream = Stream(fam_model, record=False)
    if fam:
        norms["0"] = fam_norm(stream.state.fam)

        def on_block(result: BlockResult) -> None:
            if result.index + 1 in norm_after:
                norms[str(result.index + 1)] = fam_norm(stream.state.fam)

        stream.on_block = on_block
    nll = stream.run(streamed).nll[: len(ids)]
    edges = np.linspace(0, len(nll), quarters + 1).astype(int)
    parts = [nll[a:b][np.isfinite(nll[a:b])] for a, b in pairwise(edges)]
    finite = nll[np.isfinite(nll)]
    summary = {
        "tokens": len(ids),
        "nll": float(finite.mean()),
        "nll_quarters": [float(p.mean()) for p in parts],
        "fam_norm_after_blocks": norms,
    }
    return summary


def in_window_nll(
    loaded: LoadedModel, config: FamConfig, fam_prompt: torch.Tensor | None, windows: list[list[int]]
) -> float:
    """Mean next-token NLL over windows, each streamed alone from a fresh state (one block each)."""
    model = FamModel(loaded, config, fam_prompt=fam_prompt)
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window], device=loaded.device)
            out = model.forward_block(ids, model.initial_state(1))
            nll, _ = model.next_token_nll(out.hidden, ids, None)
            values = nll[~torch.isnan(nll)]
            total += float(values.sum())
            count += values.numel()
    return total / max(count, 1)


def text_windows(
    tokenizer: PreTrainedTokenizerBase, length: int, count: int, path: Path | None = None
) -> list[list[int]]:
    """``count`` disjoint windows of ``length`` tokens of held-out ordinary text (GPL-3 by default)."""
    from famviz.training.data import HELD_OUT_TEXT

    ids = tokenizer((path or HELD_OUT_TEXT).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    step = max(length, (len(ids) - length) // max(count, 1))
    windows = [ids[s : s + length] for s in range(0, len(ids) - length + 1, step)][:count]
    if not windows:
        raise ConfigError(f"the held-out text has fewer than {length} tokens")
    return windows


# -- the comparison behind `famviz evaluate` ------------------------------------------------------------------
def long_document_comparison(
    base: LoadedModel,
    tuned: LoadedModel,
    config: FamConfig,
    prompt: torch.Tensor | None,
    documents: list[HeldOutDocument],
    on_done: Callable[[], None] | None = None,
) -> list[dict]:
    """Per held-out document: NLL overall and per quarter of the evaluated model ("tuned": ``tuned`` in
    ``config``'s mode, with ``prompt``), of the same weights with BSWA and the same memory blocks
    ("tuned_bswa": what the memory itself adds, with fine-tuning's other gains equal; only when ``tuned``
    differs from ``base``), of the untuned model with BSWA, with BSWA plus attention sinks (StreamingLLM, the
    training-free streaming baseline) and with full attention; the evaluated FAM's norm after 0, 4 and 64
    blocks. ``on_done`` after each stream."""
    rows = []
    bswa = FamConfig(mode="bswa", block_size=config.block_size, fam_len=0, mem_blocks=config.mem_blocks)
    sink = FamConfig(
        mode="sink",
        block_size=config.block_size,
        fam_len=0,
        mem_blocks=config.mem_blocks,
        sink_tokens=config.sink_tokens,
    )
    full = FamConfig(mode="full", block_size=config.block_size)
    for document in documents:
        row = {"document": document.name, "tokens": len(document.ids)}
        models = [("tuned", FamModel(tuned, config, fam_prompt=prompt))]
        if tuned is not base:
            models.append(("tuned_bswa", FamModel(tuned, bswa)))
        models += [
            ("untuned_bswa", FamModel(base, bswa)),
            ("untuned_sink", FamModel(base, sink)),
            ("untuned_full", FamModel(base, full)),
        ]
        for key, model in models:
            row[key] = long_document_eval(model, document.ids)
            if on_done is not None:
                on_done()
        row["tuned_vs_bswa"] = row["tuned"]["nll"] / row["untuned_bswa"]["nll"]
        if "tuned_bswa" in row:  # the memory's own effect: fam against bswa with the same weights
            row["tuned_vs_tuned_bswa"] = row["tuned"]["nll"] / row["tuned_bswa"]["nll"]
        log.info(
            "%s (%d tokens): NLL tuned %s %.3f %s, bswa mem%d %.3f %s, full %.3f; FAM norm %s",
            document.name,
            len(document.ids),
            config.mode,
            row["tuned"]["nll"],
            [round(q, 3) for q in row["tuned"]["nll_quarters"]],
            config.mem_blocks,
            row["untuned_bswa"]["nll"],
            [round(q, 3) for q in row["untuned_bswa"]["nll_quarters"]],
            row["untuned_full"]["nll"],
            {k: round(v, 1) for k, v in row["tuned"]["fam_norm_after_blocks"].items()},
        )
        rows.append(row)
    return rows


# -- `famviz evaluate`: every check of a (tuned) model in one command -------------------------------------------
def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from famviz.core.config import FAM_NORMS, TOOL_DEFAULTS

    parser.add_argument(
        "adapter",
        nargs="?",
        default=None,
        metavar="ADAPTER_DIR",
        help="the adapter to evaluate (its results go into its training card); none: the untuned conversion",
    )
    parser.add_argument(
        "--model", default=None, help="Hugging Face model id or local path (default: bundled SmolLM2-135M)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help=f"default: the adapter's (else {TOOL_DEFAULTS.block_size})",
    )
    parser.add_argument(
        "--fam-len", type=int, default=None, metavar="N", help=f"default: the adapter's (else {TOOL_DEFAULTS.fam_len})"
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
        help="default: the adapter's (else 0, the paper's PassKey setting)",
    )
    parser.add_argument(
        "--modes",
        default="fam,bswa,full",
        metavar="LIST",
        help="PassKey modes, all on the same keys; MODE:N sets memory blocks (default: --mem-blocks)",
    )
    parser.add_argument("--lengths", default="2048,4096,8192", metavar="LIST", help="PassKey prompt lengths (tokens)")
    parser.add_argument("--depths", default="0", metavar="LIST", help="PassKey key depths, 0…1")
    parser.add_argument("--trials", type=int, default=50, metavar="N", help="PassKey keys per cell")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="PassKey keys' seed")
    parser.add_argument("--skip-passkey", action="store_true", help="only the loss checks")
    parser.add_argument(
        "--document",
        action="append",
        default=None,
        metavar="PATH",
        help="a held-out long document (repeatable; default: GPL-3 and pydoc text)",
    )
    parser.add_argument(
        "--corpus",
        action="append",
        default=None,
        metavar="PATH",
        help="long documents from this corpus's held-out split (as `train --corpus`; default for an "
        "adapter trained on a corpus, unless --document is given)",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=8192,
        metavar="N",
        help="tokens of each long document (0: no long-document check)",
    )
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=TOOL_DEFAULTS.sink_tokens,
        metavar="S",
        help="tokens the sink baselines keep for ever (PassKey mode sink, the long documents' untuned sink row; "
        f"default {TOOL_DEFAULTS.sink_tokens})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--figure", default=None, metavar="OUT", help="the PassKey grid as a heatmap (.png, .svg, .pdf, .html)"
    )


def _geometry(args: argparse.Namespace, adapter: Adapter | None) -> FamConfig:
    from famviz.core.config import TOOL_DEFAULTS, check_limit, check_limits

    trained = adapter.trained_config() if adapter is not None else dataclasses.replace(TOOL_DEFAULTS, mem_blocks=0)
    # The fam config carries the sink baselines' count, which check_limits skips outside sink mode.
    check_limit("sink_tokens", getattr(args, "sink_tokens", TOOL_DEFAULTS.sink_tokens))
    return check_limits(
        FamConfig(
            mode="fam",
            block_size=trained.block_size if args.block_size is None else args.block_size,
            fam_len=trained.fam_len if args.fam_len is None else args.fam_len,
            mem_blocks=trained.mem_blocks if args.mem_blocks is None else args.mem_blocks,
            sink_tokens=getattr(args, "sink_tokens", TOOL_DEFAULTS.sink_tokens),  # for the sink baselines
            fam_norm=trained.fam_norm if getattr(args, "fam_norm", None) is None else args.fam_norm,
        )
    )


@dataclass
class EvaluationPlan:
    """What `famviz evaluate` will run, checked before anything is loaded."""

    adapter: object  # famviz.io.adapters.Adapter or None
    config: FamConfig
    lengths: list[int]
    depths: list[float]
    specs: list  # famviz.probes.passkey.ModeSpec
    corpus: list[str] | None = None  # long documents from this corpus's held-out split
    figure: str | None = None  # where the PassKey grid's heatmap goes (checked)


def plan_evaluation(args: argparse.Namespace) -> EvaluationPlan:
    """The checked plan, or a FamvizError with one clear message (bad numbers, modes, files, adapter)."""
    from famviz.io.adapters import read_adapter
    from famviz.io.documents import read_document
    from famviz.probes import passkey as pk

    adapter = read_adapter(args.adapter) if args.adapter else None
    config = _geometry(args, adapter)
    lengths = number_list(args.lengths, int, "--lengths")
    depths = number_list(args.depths, float, "--depths")
    if any(n < 64 for n in lengths) or any(not 0 <= d <= 1 for d in depths) or args.trials < 1:
        raise ConfigError("PassKey lengths must be at least 64 tokens, depths within 0…1 and --trials at least 1")
    try:
        specs = [pk.ModeSpec.parse(m, config.mem_blocks) for m in args.modes.split(",") if m.strip()]
    except ValueError as exc:
        raise ConfigError(f"--modes: {exc}") from None
    if args.long_tokens and args.long_tokens < MIN_LONG_TOKENS:
        raise ConfigError(f"--long-tokens must be 0 or at least {MIN_LONG_TOKENS}, got {args.long_tokens}")
    for path in args.document or []:
        read_document(path)  # unreadable documents fail now, not after the model has loaded
    corpus = getattr(args, "corpus", None)
    if corpus and args.document:
        raise ConfigError("give --document or --corpus, not both")
    if corpus and args.long_tokens:
        from famviz.io.corpus import Corpus

        Corpus(corpus)  # a missing or unreadable corpus fails now
    elif not args.document and args.long_tokens and adapter is not None:
        corpus = trained_corpus(adapter.directory)  # the held-out split of the adapter's own training text
        if corpus and not all(Path(p).exists() for p in corpus):
            log.warning(
                "the corpus the adapter was trained on (%s) is not here: long documents are GPL-3 and pydoc",
                ", ".join(corpus),
            )
            corpus = None
    from famviz.commands import check_figure_path

    figure = check_figure_path(getattr(args, "figure", None))
    if figure and args.skip_passkey:
        raise ConfigError("--figure draws the PassKey grid: leave out --skip-passkey")
    return EvaluationPlan(adapter, config, lengths, depths, specs, corpus if args.long_tokens else None, figure)


def trained_corpus(directory: str | Path) -> list[str] | None:
    """The corpus paths an adapter was trained on, from its training card (None: the machine's text)."""
    from famviz.io.adapters import read_training_card

    try:
        sources = read_training_card(directory).get("data_mixture", {}).get("text_sources")
    except (OSError, ValueError):
        return None
    return list(sources["paths"]) if isinstance(sources, dict) and sources.get("paths") else None


def evaluate(args: argparse.Namespace, plan: EvaluationPlan, result: dict, progress: tqdm | None = None) -> dict:
    """Fill ``result`` step by step (so an interruption keeps what is done): in-window loss, long-document
    NLL per quarter with the FAM norm, and the PassKey grid of every mode on the same keys."""
    from famviz.io.adapters import apply_adapter
    from famviz.io.models import load_model
    from famviz.probes import passkey as pk

    adapter, config, lengths, depths, specs = plan.adapter, plan.config, plan.lengths, plan.depths, plan.specs
    base = load_model(args.model, device=args.device, dtype=args.dtype)
    tuned = load_model(args.model, device=args.device, dtype=args.dtype) if adapter is not None else base
    prompt = apply_adapter(args.adapter, tuned, config) if adapter is not None else None
    result.update(
        model=base.name,
        adapter=str(adapter.directory) if adapter else None,
        label=tuned.label,
        config=config.to_dict(),
        sink_tokens=config.sink_tokens,  # of the sink baselines (the fam config's record leaves it out)
        dtype=str(base.dtype).replace("torch.", ""),
        device=str(base.device),
    )
    documents = []
    if args.long_tokens:
        documents = (
            corpus_documents(base.tokenizer, args.long_tokens, plan.corpus)
            if plan.corpus
            else held_out_documents(base.tokenizer, args.long_tokens, args.document)
        )
    n_docs = len(documents)
    total = (
        3
        + ((4 + (adapter is not None)) * n_docs if args.long_tokens else 0)
        + (0 if args.skip_passkey else len(specs) * len(lengths) * len(depths) * args.trials)
    )
    if progress is not None:
        progress.reset(total=total)
    tick = (lambda *_: progress.update(1)) if progress is not None else (lambda *_: None)

    windows = text_windows(base.tokenizer, config.block_size, 8)
    nll = {"windows": len(windows), "window_tokens": config.block_size, "text": "GPL-3 (held out from training)"}
    nll["untuned_full_attention"] = in_window_nll(
        base, FamConfig(mode="full", block_size=config.block_size), None, windows
    )
    tick()
    nll["untuned_same_mode"] = in_window_nll(base, config, None, windows)  # what the conversion alone costs
    tick()
    nll["tuned"] = in_window_nll(tuned, config, prompt, windows)
    tick()
    nll["relative_change"] = nll["tuned"] / nll["untuned_full_attention"] - 1
    result["in_window_nll"] = nll
    result["long_documents"] = []
    if args.long_tokens:
        result["long_documents"] = long_document_comparison(base, tuned, config, prompt, documents, on_done=tick)
        if plan.corpus:
            result["long_documents_source"] = {"corpus": plan.corpus, "split": "held out (famviz.io.corpus)"}
    result["passkey"] = []
    if not args.skip_passkey:
        result["passkey_scoring"] = (
            "greedy decoding, first integer of the answer equals the key (famviz.probes.passkey)"
        )
        pk.sweep(
            tuned,
            specs,
            lengths,
            depths,
            args.trials,
            seed=args.seed,
            base=config,
            fam_prompt=prompt,
            on_trial=tick,
            on_cell=lambda cell: result["passkey"].append(cell.summary()),
        )
    return result


def evaluation_table(result: dict) -> str:
    """The evaluation as plain-text tables for a terminal."""
    lines = [
        f"famviz evaluate · {result.get('label')} · {result.get('config')} · {result.get('dtype')}"
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
    for row in result.get("long_documents") or []:
        lines += ["", f"Long document {row['document']} ({row['tokens']:,} tokens): mean NLL [quarters]"]
        for key, label in LONG_DOCUMENT_MODELS:
            if key not in row:
                continue
            part = row[key]
            lines.append(
                f"  {label:<27} {part['nll']:.3f}  [" + " ".join(f"{q:.3f}" for q in part["nll_quarters"]) + "]"
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


def run_evaluate(args: argparse.Namespace) -> int:
    """`famviz evaluate`: the result to stdout (table, or JSON with --json) and, with an adapter, into its card;
    a progress bar on stderr; Ctrl-C keeps and reports what was done (exit status 130)."""
    import json
    import time

    from tqdm import tqdm

    from famviz.io.adapters import read_training_card, write_training_card

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = plan_evaluation(args)
    result: dict = {}
    started = time.time()
    status = 0
    with tqdm(total=1, desc="evaluate", unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
        try:
            evaluate(args, plan, result, progress)
        except KeyboardInterrupt:
            result["interrupted"] = True
            status = 130
    if not result.get("config"):  # interrupted while loading: nothing to report
        return status
    result["seconds"] = round(time.time() - started, 1)
    if args.adapter:
        directory = Path(args.adapter)
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
    if plan.figure and result.get("passkey"):
        from famviz.probes.passkey import CellResult
        from famviz.viz.export import write_figure
        from famviz.viz.passkey_figures import passkey_heatmap

        cells = [CellResult(**cell) for cell in result["passkey"]]
        figure = passkey_heatmap(cells, title=f"PassKey retrieval: {result['label']}")
        caption = f"{result['model']}; {args.trials} trials per cell, seed {args.seed}, greedy"
        try:
            result["figure"] = str(write_figure(figure, plan.figure, caption=caption, size=(1100, 420)))
        except FamvizError as exc:  # the figure is lost, not the results printed below
            log.error("the PassKey figure was not written: %s", exc)
            result["figure_error"] = str(exc)
    print(json.dumps(result) if args.json else evaluation_table(result))
    return status

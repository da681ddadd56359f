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
from famviz.training.evaluate_options import (
    CORPUS_DOCUMENTS,
    FULL,
    MIN_LONG_TOKENS,
    MIN_PASSKEY_LENGTH,
    Sizes,
    sizes_for,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable

    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

    from famviz.core.engine import BlockResult
    from famviz.core.model import LoadedModel
    from famviz.io.adapters import Adapter

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


def held_out_documents(
    tokenizer: PreTrainedTokenizerBase, tokens: int, paths: list[str] | None = None, count: int | None = None
) -> list[HeldOutDocument]:
    """The first ``tokens`` tokens of each given file, or of GPL-3 (7,658 tokens: used whole) and the pydoc
    text by default (the first ``count`` of those two: only those are read). A document shorter than
    ``MIN_LONG_TOKENS`` is refused: it would check nothing long.
    """
    from famviz.io.documents import read_document
    from famviz.training.data import HELD_OUT_TEXT

    if paths:
        sources = [(Path(p).name, read_document(p)) for p in paths]
    else:
        defaults = [("GPL-3", lambda: HELD_OUT_TEXT.read_text(encoding="utf-8")), ("pydoc", pydoc_text)]
        sources = [(name, read()) for name, read in defaults[:count]]
    documents = []
    for name, text in sources:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < MIN_LONG_TOKENS:
            raise ConfigError(
                f"{name} has {len(ids)} tokens, fewer than the {MIN_LONG_TOKENS} a long-document check needs"
            )
        documents.append(HeldOutDocument(name, ids[:tokens]))
    return documents


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


NORM_AFTER_BLOCKS = (4, 64)  # the FAM norm is read after a few and after many blocks


def streamed_tokens(config: FamConfig, tokens: int, norm_after: Iterable[int] = NORM_AFTER_BLOCKS) -> int:
    """How many tokens ``long_document_eval`` streams for a document of ``tokens``: the document, repeated in
    fam mode up to the last block the FAM norm is read after."""
    longest = max(norm_after, default=0) * config.block_size
    return max(tokens, longest) if config.active_fam_len and longest else tokens


@torch.inference_mode()
def long_document_eval(
    fam_model: FamModel,
    ids: list[int],
    quarters: int = 4,
    norm_after: tuple[int, ...] = NORM_AFTER_BLOCKS,
    on_tokens: Callable[[int], None] | None = None,
) -> dict:
    """Stream ``ids`` from the initial state; mean NLL overall and per quarter, and the FAM norm after the
    blocks in ``norm_after`` (the document is streamed again, repeated, where it has fewer blocks).
    ``on_tokens`` gets each block's token count as the stream goes."""
    from famviz.core.engine import Stream

    fam = bool(fam_model.fam_len and norm_after)
    # One stream: the document, repeated where the norm is asked after more blocks than it has (causal, so
    # the document's own losses are those of streaming it alone).
    length = streamed_tokens(fam_model.config, len(ids), norm_after)
    streamed = (ids * (length // len(ids) + 1))[:length]
    norms: dict[str, float] = {}
    stream = Stream(fam_model, record=False)
    if fam:
        norms["0"] = fam_norm(stream.state.fam)

    def on_block(result: BlockResult) -> None:
        if fam and result.index + 1 in norm_after:
            norms[str(result.index + 1)] = fam_norm(stream.state.fam)
        if on_tokens is not None:
            on_tokens(len(result.token_ids))

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
    loaded: LoadedModel,
    config: FamConfig,
    fam_prompt: torch.Tensor | None,
    windows: list[list[int]],
    on_tokens: Callable[[int], None] | None = None,
) -> float:
    """Mean next-token NLL over windows, each streamed alone from a fresh state (one block each);
    ``on_tokens`` gets each window's token count when it is done."""
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
            if on_tokens is not None:
                on_tokens(len(window))
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
def comparison_configs(config: FamConfig, tuned: bool) -> list[tuple[str, bool, FamConfig]]:
    """The streams of each long document: (key, whether the tuned weights stream it, config)."""
    bswa = FamConfig(mode="bswa", block_size=config.block_size, fam_len=0, mem_blocks=config.mem_blocks)
    sink = FamConfig(
        mode="sink",
        block_size=config.block_size,
        fam_len=0,
        mem_blocks=config.mem_blocks,
        sink_tokens=config.sink_tokens,
    )
    full = FamConfig(mode="full", block_size=config.block_size)
    streams = [("tuned", True, config)] + ([("tuned_bswa", True, bswa)] if tuned else [])
    return streams + [("untuned_bswa", False, bswa), ("untuned_sink", False, sink), ("untuned_full", False, full)]


def comparison_tokens(
    config: FamConfig, tuned: bool, documents: list[HeldOutDocument], norm_after: tuple[int, ...] = NORM_AFTER_BLOCKS
) -> int:
    """Tokens ``long_document_comparison`` streams in all (what its progress counts)."""
    return sum(
        streamed_tokens(stream_config, len(document.ids), norm_after)
        for document in documents
        for _, _, stream_config in comparison_configs(config, tuned)
    )


def long_document_comparison(
    base: LoadedModel,
    tuned: LoadedModel,
    config: FamConfig,
    prompt: torch.Tensor | None,
    documents: list[HeldOutDocument],
    norm_after: tuple[int, ...] = NORM_AFTER_BLOCKS,
    on_tokens: Callable[[int], None] | None = None,
) -> list[dict]:
    """Per held-out document: NLL overall and per quarter of the evaluated model ("tuned": ``tuned`` in
    ``config``'s mode, with ``prompt``), of the same weights with BSWA and the same memory blocks
    ("tuned_bswa": what the memory itself adds, with fine-tuning's other gains equal; only when ``tuned``
    differs from ``base``), of the untuned model with BSWA, with BSWA plus attention sinks (StreamingLLM, the
    training-free streaming baseline) and with full attention; the evaluated FAM's norm after 0 blocks and
    the blocks in ``norm_after``. ``on_tokens`` gets each streamed block's token count."""
    rows = []
    for document in documents:
        row = {"document": document.name, "tokens": len(document.ids)}
        for key, on_tuned, stream_config in comparison_configs(config, tuned is not base):
            model = FamModel(tuned if on_tuned else base, stream_config, fam_prompt=prompt if key == "tuned" else None)
            row[key] = long_document_eval(model, document.ids, norm_after=norm_after, on_tokens=on_tokens)
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
    sizes: Sizes = FULL
    norm_after: tuple[int, ...] = NORM_AFTER_BLOCKS
    quick: bool = False
    write_card: bool = False  # record the results in the adapter's training card

    @property
    def parts(self) -> list[str]:
        """The parts run, in order (each gets its own progress bar)."""
        return (
            ["loading", "in-window loss"]
            + (["long documents"] if self.sizes.long_tokens else [])
            + (["PassKey"] if self.specs else [])
        )


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
    from famviz.io.documents import read_document
    from famviz.probes import passkey as pk

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    adapter = read_adapter(args.adapter) if args.adapter else None
    if getattr(args, "write_card", False) and adapter is None:
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
    for path in args.document or []:
        read_document(path)  # unreadable documents fail now, not after the model has loaded
    corpus = getattr(args, "corpus", None)
    if corpus and args.document:
        raise ConfigError("give --document or --corpus, not both")
    if corpus and sizes.long_tokens:
        from famviz.io.corpus import Corpus

        Corpus(corpus)  # a missing or unreadable corpus fails now
    elif not args.document and sizes.long_tokens and adapter is not None:
        corpus = trained_corpus(adapter.directory)  # the held-out split of the adapter's own training text
        if corpus and not all(Path(p).exists() for p in corpus):
            log.warning(
                "the corpus the adapter was trained on (%s) is not here: long documents are GPL-3 and pydoc",
                ", ".join(corpus),
            )
            corpus = None
    from famviz.io.paths import check_figure_path

    figure = check_figure_path(getattr(args, "figure", None))
    if figure and args.skip_passkey:
        raise ConfigError("--figure draws the PassKey grid: leave out --skip-passkey")
    return EvaluationPlan(
        adapter,
        config,
        lengths,
        depths,
        [] if args.skip_passkey else specs,
        corpus if sizes.long_tokens else None,
        figure,
        sizes=sizes,
        norm_after=tuple(norm_after),
        quick=getattr(args, "quick", False),
        write_card=getattr(args, "write_card", False),
    )


def trained_corpus(directory: str | Path) -> list[str] | None:
    """The corpus paths an adapter was trained on, from its training card (None: the machine's text)."""
    from famviz.io.adapters import read_training_card

    try:
        sources = read_training_card(directory).get("data_mixture", {}).get("text_sources")
    except (OSError, ValueError):
        return None
    return list(sources["paths"]) if isinstance(sources, dict) and sources.get("paths") else None


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


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def load_models(
    args: argparse.Namespace, plan: EvaluationPlan, progress: PartProgress
) -> tuple[LoadedModel, LoadedModel, torch.Tensor | None]:
    """(untuned model, evaluated model, its FAM prompt): the evaluated one is a second copy with the adapter
    merged in, or the untuned model itself."""
    from famviz.io.adapters import apply_adapter
    from famviz.io.models import load_model

    copies = 2 if plan.adapter is not None else 1
    what = "the model and a copy with the adapter" if copies == 2 else "the model"
    tick = progress.start("loading", what, copies, unit="model")
    base = load_model(args.model, device=args.device, dtype=args.dtype)
    tick(1)
    if plan.adapter is None:
        return base, base, None
    tuned = load_model(args.model, device=args.device, dtype=args.dtype)
    prompt = apply_adapter(args.adapter, tuned, plan.config)
    tick(1)
    return base, tuned, prompt


def evaluate(
    args: argparse.Namespace, plan: EvaluationPlan, result: dict, progress: PartProgress | None = None
) -> dict:
    """Fill ``result`` step by step (so an interruption keeps what is done): in-window loss, long-document
    NLL per quarter with the FAM norm, and the PassKey grid of every mode on the same keys."""
    from famviz.probes import passkey as pk

    progress = progress or PartProgress(plan.parts, enabled=False)
    adapter, config, lengths, depths, specs = plan.adapter, plan.config, plan.lengths, plan.depths, plan.specs
    sizes = plan.sizes
    base, tuned, prompt = load_models(args, plan, progress)
    result.update(
        model=base.name,
        adapter=str(adapter.directory) if adapter else None,
        label=tuned.label,
        config=config.to_dict(),
        sink_tokens=config.sink_tokens,  # of the sink baselines (the fam config's record leaves it out)
        dtype=str(base.dtype).replace("torch.", ""),
        device=str(base.device),
        quick=plan.quick,
    )

    windows = text_windows(base.tokenizer, config.block_size, sizes.windows)
    tick = progress.start(
        "in-window loss", f"{_plural(len(windows), 'window')} × 3 models", 3 * sum(len(w) for w in windows)
    )
    nll = {"windows": len(windows), "window_tokens": config.block_size, "text": "GPL-3 (held out from training)"}
    nll["untuned_full_attention"] = in_window_nll(
        base, FamConfig(mode="full", block_size=config.block_size), None, windows, tick
    )
    nll["untuned_same_mode"] = in_window_nll(base, config, None, windows, tick)  # what the conversion alone costs
    nll["tuned"] = in_window_nll(tuned, config, prompt, windows, tick)
    nll["relative_change"] = nll["tuned"] / nll["untuned_full_attention"] - 1
    result["in_window_nll"] = nll
    result["long_documents"] = []
    if sizes.long_tokens:
        documents = (
            corpus_documents(base.tokenizer, sizes.long_tokens, plan.corpus, sizes.long_documents or CORPUS_DOCUMENTS)
            if plan.corpus
            else held_out_documents(base.tokenizer, sizes.long_tokens, args.document, sizes.long_documents)
        )
        streams = len(comparison_configs(config, tuned is not base))
        tick = progress.start(
            "long documents",
            f"{_plural(len(documents), 'document')} × {streams} streams",
            comparison_tokens(config, tuned is not base, documents, plan.norm_after),
        )
        result["long_documents"] = long_document_comparison(
            base, tuned, config, prompt, documents, norm_after=plan.norm_after, on_tokens=tick
        )
        if plan.corpus:
            result["long_documents_source"] = {"corpus": plan.corpus, "split": "held out (famviz.io.corpus)"}
    result["passkey"] = []
    if specs:
        result["passkey_scoring"] = (
            "greedy decoding, first integer of the answer equals the key (famviz.probes.passkey)"
        )
        detail = " × ".join(
            [
                _plural(len(specs), "mode"),
                _plural(len(lengths), "length"),
                _plural(len(depths), "depth"),
                _plural(sizes.trials, "key"),
            ]
        )
        # counted in prompt tokens, so that longer prompts weigh as much as they take
        tick = progress.start("PassKey", detail, len(specs) * len(depths) * sizes.trials * sum(lengths))
        documents = pk.sweep_documents(tuned.tokenizer, lengths, depths, sizes.trials, args.seed)
        for step in pk.iter_sweep(tuned, specs, documents, base=config, fam_prompt=prompt):
            tick(step.trial.length)
            if step.cell_done:
                result["passkey"].append(step.cell.summary())
    progress.close()
    return result


def evaluation_table(result: dict) -> str:
    """The evaluation as plain-text tables for a terminal."""
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
    """`famviz evaluate`: the result to stdout (table, or JSON with --json) and, with --write-card, into the
    adapter's training card; a progress bar per part on stderr, and a line saying where the results went;
    Ctrl-C keeps and reports what was done (exit status 130)."""
    import json
    import time

    plan = plan_evaluation(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {}
    started = time.time()
    status = 0
    progress = PartProgress(plan.parts)
    try:
        evaluate(args, plan, result, progress)
    except KeyboardInterrupt:
        result["interrupted"] = True
        status = 130
    finally:
        progress.close()
    if not result.get("config"):  # interrupted while loading: nothing to report
        return status
    result["seconds"] = round(time.time() - started, 1)
    if plan.write_card:
        record_in_card(Path(args.adapter), result)
    if plan.figure and result.get("passkey"):
        write_passkey_figure(plan.figure, result, plan.sizes.trials, args.seed)
    print(json.dumps(result) if args.json else evaluation_table(result))
    print(f"famviz: {where_results_went(args, plan, result)}", file=sys.stderr)
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


def where_results_went(args: argparse.Namespace, plan: EvaluationPlan, result: dict) -> str:
    """One line for stderr: whether the results are in the adapter's card (and the figure's file)."""
    from famviz.io.adapters import CARD_JSON, CARD_MARKDOWN

    if plan.write_card:
        directory = Path(args.adapter)
        where = f"results recorded in {directory / CARD_JSON} and {directory / CARD_MARKDOWN}"
    elif args.adapter:
        where = f"results printed only; {args.adapter}'s training card is unchanged (--write-card records them)"
    else:
        where = "results printed only"
    return where + (f"; PassKey figure in {result['figure']}" if result.get("figure") else "")

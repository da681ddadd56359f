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
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from famviz.core.config import FamConfig
from famviz.core.fam_model import FamModel
from famviz.core.modes import mode_names
from famviz.errors import ConfigError
from famviz.training.evaluation_plan import CORPUS_DOCUMENTS, MIN_LONG_TOKENS, NORM_AFTER_BLOCKS, EvaluationPlan

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from transformers import PreTrainedTokenizerBase

    from famviz.core.engine import BlockResult
    from famviz.core.model import LoadedModel

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
    """The streams of each long document: (key, whether the tuned weights stream it, config): the evaluated run,
    the same weights as BSWA with the same memory (the memory's own effect; only when ``tuned``), and the untuned
    model in every baseline mode of the mode table (``untuned_bswa``, ``untuned_sink``, ``untuned_full``), each
    with the evaluated run's geometry."""
    streams = [("tuned", True, config)] + ([("tuned_bswa", True, config.in_mode("bswa"))] if tuned else [])
    return streams + [(f"untuned_{mode}", False, config.in_mode(mode)) for mode in mode_names("baseline")]


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


def trained_corpus(directory: str | Path) -> list[str] | None:
    """The corpus paths an adapter was trained on, from its training card (None: the machine's text)."""
    from famviz.io.adapters import read_training_card

    try:
        sources = read_training_card(directory).get("data_mixture", {}).get("text_sources")
    except (OSError, ValueError):
        return None
    return list(sources["paths"]) if isinstance(sources, dict) and sources.get("paths") else None


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


# What a part of the evaluation reports its progress to: called with (part, what it runs, its total count,
# the unit counted) when the part starts, it returns what to call with each step's count.
StartPart = Callable[[str, str, int, str], Callable[[int], None]]


def no_progress(part: str, detail: str, total: int, unit: str) -> Callable[[int], None]:
    return lambda count: None


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation has found so far; a part that has not run (yet) is None."""

    model: str
    adapter: str | None
    label: str
    config: dict
    sink_tokens: int  # of the sink baselines (the fam config's record leaves it out)
    dtype: str
    device: str
    quick: bool
    in_window_nll: dict | None = None
    long_documents: tuple[dict, ...] | None = None  # one row per document (long_document_comparison)
    long_documents_source: dict | None = None  # where a corpus's documents came from
    passkey: tuple[dict, ...] | None = None  # one summary per finished cell (CellResult.summary)
    passkey_scoring: str | None = None

    def to_dict(self) -> dict:
        """The JSON record (``--json``, the training card) of the parts run so far."""
        record = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue  # a part not run
            record[field.name] = list(value) if isinstance(value, tuple) else value
        return record


def load_models(plan: EvaluationPlan, start_part: StartPart) -> tuple[LoadedModel, LoadedModel, torch.Tensor | None]:
    """(untuned model, evaluated model, its FAM prompt): the evaluated one is a second copy with the adapter
    merged in, or the untuned model itself."""
    from famviz.io.adapters import apply_adapter
    from famviz.io.models import load_model

    copies = 2 if plan.adapter is not None else 1
    what = "the model and a copy with the adapter" if copies == 2 else "the model"
    tick = start_part("loading", what, copies, "model")
    base = load_model(plan.model, device=plan.device, dtype=plan.dtype)
    tick(1)
    if plan.adapter is None:
        return base, base, None
    tuned = load_model(plan.model, device=plan.device, dtype=plan.dtype)
    prompt = apply_adapter(plan.adapter.directory, tuned, plan.config)
    tick(1)
    return base, tuned, prompt


def iter_evaluation(plan: EvaluationPlan, start_part: StartPart = no_progress) -> Iterator[EvaluationResult]:
    """Run the plan: in-window loss, long-document NLL per quarter with the FAM norm, and the PassKey grid of
    every mode on the same keys. Yields the result so far after loading, after each part and after each
    PassKey cell, so that whoever stops the run keeps what was done."""
    config, sizes = plan.config, plan.sizes
    base, tuned, prompt = load_models(plan, start_part)
    result = EvaluationResult(
        model=base.name,
        adapter=str(plan.adapter.directory) if plan.adapter else None,
        label=tuned.label,
        config=config.to_dict(),
        sink_tokens=config.sink_tokens,
        dtype=str(base.dtype).replace("torch.", ""),
        device=str(base.device),
        quick=plan.quick,
    )
    yield result
    nll = _in_window_part(base, tuned, prompt, config, sizes.windows, start_part)
    result = dataclasses.replace(result, in_window_nll=nll, long_documents=())
    yield result
    if sizes.long_tokens:
        rows = _long_document_part(plan, base, tuned, prompt, start_part)
        source = {"corpus": plan.corpus, "split": "held out (famviz.io.corpus)"} if plan.corpus else None
        result = dataclasses.replace(result, long_documents=tuple(rows), long_documents_source=source)
        yield result
    result = dataclasses.replace(result, passkey=())
    if plan.specs:
        scoring = "greedy decoding, first integer of the answer equals the key (famviz.probes.passkey)"
        result = dataclasses.replace(result, passkey_scoring=scoring)
        for cell in _passkey_cells(plan, base, tuned, prompt, start_part):
            result = dataclasses.replace(result, passkey=(*result.passkey, cell))
            yield result
    yield result


def _in_window_part(
    base: LoadedModel,
    tuned: LoadedModel,
    prompt: torch.Tensor | None,
    config: FamConfig,
    n_windows: int,
    start_part: StartPart,
) -> dict:
    windows = text_windows(base.tokenizer, config.block_size, n_windows)
    tick = start_part(
        "in-window loss", f"{_plural(len(windows), 'window')} × 3 models", 3 * sum(len(w) for w in windows), "tok"
    )
    nll = {"windows": len(windows), "window_tokens": config.block_size, "text": "GPL-3 (held out from training)"}
    nll["untuned_full_attention"] = in_window_nll(
        base, FamConfig(mode="full", block_size=config.block_size), None, windows, tick
    )
    nll["untuned_same_mode"] = in_window_nll(base, config, None, windows, tick)  # what the conversion alone costs
    nll["tuned"] = in_window_nll(tuned, config, prompt, windows, tick)
    nll["relative_change"] = nll["tuned"] / nll["untuned_full_attention"] - 1
    return nll


def _long_document_part(
    plan: EvaluationPlan, base: LoadedModel, tuned: LoadedModel, prompt: torch.Tensor | None, start_part: StartPart
) -> list[dict]:
    sizes, config = plan.sizes, plan.config
    documents = (
        corpus_documents(base.tokenizer, sizes.long_tokens, plan.corpus, sizes.long_documents or CORPUS_DOCUMENTS)
        if plan.corpus
        else held_out_documents(base.tokenizer, sizes.long_tokens, plan.documents, sizes.long_documents)
    )
    streams = len(comparison_configs(config, tuned is not base))
    tick = start_part(
        "long documents",
        f"{_plural(len(documents), 'document')} × {streams} streams",
        comparison_tokens(config, tuned is not base, documents, plan.norm_after),
        "tok",
    )
    return long_document_comparison(base, tuned, config, prompt, documents, norm_after=plan.norm_after, on_tokens=tick)


def _passkey_cells(
    plan: EvaluationPlan, base: LoadedModel, tuned: LoadedModel, prompt: torch.Tensor | None, start_part: StartPart
) -> Iterator[dict]:
    """Each finished cell's summary, every mode on the same keys."""
    from famviz.probes import passkey as pk

    specs, lengths, depths, trials = plan.specs, plan.lengths, plan.depths, plan.sizes.trials
    counts = ((len(specs), "mode"), (len(lengths), "length"), (len(depths), "depth"), (trials, "key"))
    detail = " × ".join(_plural(count, word) for count, word in counts)
    # counted in prompt tokens, so that longer prompts weigh as much as they take
    tick = start_part("PassKey", detail, len(specs) * len(depths) * trials * sum(lengths), "tok")
    documents = pk.sweep_documents(tuned.tokenizer, lengths, depths, trials, plan.seed)
    for step in pk.iter_sweep(tuned, specs, documents, base=plan.config, fam_prompt=prompt):
        tick(step.trial.length)
        if step.cell_done:
            yield step.cell.summary()

"""Long-document evaluation of a FAM model: next-token loss per quarter of a document, and the FAM's norm.

A memory that only helps on average can still drift: its state grows with every update until, late in a
long document, it hurts. So the loss is reported per quarter of the document (drift shows as a rising last
quarter), and the FAM's norm (mean over layers and slots of each slot's L2 norm) after a few and after
many blocks.

Held-out text: GPL-3 (excluded from training, see ``training_data.HELD_OUT_TEXT``) and the plain-text
documentation of a fixed list of Python standard-library modules (``pydoc``), which training never reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .fam_model import FamModel

PYDOC_MODULES = ("argparse", "collections", "contextlib", "dataclasses", "functools", "itertools", "json",
                 "logging", "pathlib", "re", "subprocess", "threading", "typing", "unittest")


@dataclass
class HeldOutDocument:
    name: str
    ids: list[int]


def pydoc_text(modules=PYDOC_MODULES) -> str:
    """The plain-text ``pydoc`` pages of ``modules``, joined (deterministic for a Python version)."""
    import importlib
    import pydoc

    pages = []
    for name in modules:
        pages.append(pydoc.plain(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)))
    return "\n\n".join(pages)


MIN_LONG_TOKENS = 1024


def held_out_documents(tokenizer, tokens: int, paths: list[str] | None = None) -> list[HeldOutDocument]:
    """The first ``tokens`` tokens of each given file, or of GPL-3 (7,658 tokens: used whole) and the pydoc
    text by default. A document shorter than ``MIN_LONG_TOKENS`` is refused: it would check nothing long.
    """
    from .training_data import HELD_OUT_TEXT

    sources = [(Path(p).name, Path(p).read_text(encoding="utf-8", errors="replace")) for p in paths] if paths else \
        [("GPL-3", HELD_OUT_TEXT.read_text(encoding="utf-8")), ("pydoc", pydoc_text())]
    documents = []
    for name, text in sources:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < MIN_LONG_TOKENS:
            raise ConfigError(f"{name} has {len(ids)} tokens, fewer than the {MIN_LONG_TOKENS} a long-document check needs")
        documents.append(HeldOutDocument(name, ids[:tokens]))
    return documents


def fam_norm(fam: tuple[torch.Tensor, ...]) -> float:
    """Mean over layers and slots of the FAM slots' L2 norms (batch element 0)."""
    return float(torch.stack([f[0].float().norm(dim=-1).mean() for f in fam]).mean())


@torch.inference_mode()
def long_document_eval(fam_model: FamModel, ids: list[int], quarters: int = 4,
                       norm_after: tuple[int, ...] = (4, 64)) -> dict:
    """Stream ``ids`` from the initial state; mean NLL overall and per quarter, and the FAM norm after the
    blocks in ``norm_after`` (the document is streamed again, repeated, where it has fewer blocks)."""
    from .engine import Stream

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

        def on_block(result) -> None:
            if result.index + 1 in norm_after:
                norms[str(result.index + 1)] = fam_norm(stream.state.fam)

        stream.on_block = on_block
    nll = stream.run(streamed).nll[: len(ids)]
    edges = np.linspace(0, len(nll), quarters + 1).astype(int)
    parts = [nll[a:b][np.isfinite(nll[a:b])] for a, b in zip(edges[:-1], edges[1:])]
    finite = nll[np.isfinite(nll)]
    summary = {"tokens": len(ids), "nll": float(finite.mean()), "nll_quarters": [float(p.mean()) for p in parts],
               "fam_norm_after_blocks": norms}
    return summary

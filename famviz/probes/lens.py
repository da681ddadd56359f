"""The memory lens as a probe: does the FAM hold a pass key's digits, read through the lens?

The lens (``FamModel.lens``; the trace's ``fam.*.lens`` channels) decodes each FAM slot through the final
norm and the unembedding. Here it is asked one question with a control: after the block that holds a
PassKey sentence (and ``blocks_after`` more updates), is one of the key's digit tokens among the top-k
tokens of some slot at the chosen layers, and is it in the same document with the key sentence taken
out? The control matters: digits are common tokens, and a slot may point at them whatever it read.

    >>> finding = key_in_lens(fam_model, make_passkey_document(tokenizer, 2048, seed=1), layers=[28, 29], k=10)
    >>> finding.with_key, finding.without_key
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from famviz.core.fam_model import FamModel, StreamState
from famviz.probes.passkey import PasskeyDocument, advance

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class KeyInLens:
    """What the lens showed of one document's key, and of the same document without it."""

    key: int
    blocks_after: int  # FAM updates after the key's block when the lens was read
    slots_with_key: int  # (layer, slot) pairs with a key digit among their top k
    slots_without_key: int  # the same, the key sentence taken out of the document

    @property
    def with_key(self) -> bool:
        return self.slots_with_key > 0

    @property
    def without_key(self) -> bool:
        return self.slots_without_key > 0


def key_digit_ids(tokenizer: PreTrainedTokenizerBase, document: PasskeyDocument) -> set[int]:
    """The tokens of the document's key sentence whose text holds a digit (the key as the model saw it)."""
    start, end = document.key_span
    return {t for t in document.token_ids[start:end] if any(c.isdigit() for c in tokenizer.decode([t]))}


def slots_showing(fam_model: FamModel, state: StreamState, layers: Sequence[int], k: int, wanted: Iterable[int]) -> int:
    """How many (layer, slot) pairs of ``state``'s FAM have one of ``wanted`` among their lens's top ``k``."""
    wanted = torch.tensor(sorted(set(wanted)), dtype=torch.long)
    with torch.inference_mode():
        slots = torch.stack([state.fam[layer][0] for layer in layers])  # (layers, fam_len, d)
        ids, _ = fam_model.lens(slots, k)
    return int(torch.isin(ids.cpu(), wanted).any(dim=-1).sum())


def key_in_lens(
    fam_model: FamModel,
    tokenizer: PreTrainedTokenizerBase,
    document: PasskeyDocument,
    layers: Sequence[int],
    k: int = 10,
    blocks_after: int = 0,
) -> KeyInLens:
    """The lens after the key's block (+ ``blocks_after`` blocks), with the key and without it; the
    document must run that many whole blocks before its question (a ValueError otherwise)."""
    if not fam_model.fam_len:
        raise ValueError("the memory lens needs FAM slots (fam mode)")
    block = fam_model.config.block_size
    start, end = document.key_span
    stop = (end // block + 1 + blocks_after) * block  # whole blocks, through the key's and blocks_after more
    haystack = document.haystack_ids
    without = haystack[:start] + haystack[end:]
    if stop > len(without):
        raise ValueError(f"the document has fewer than {stop} tokens before its question (key span {start}–{end})")
    digits = key_digit_ids(tokenizer, document)
    seen = []
    for ids in (haystack, without):
        with torch.inference_mode():
            state = advance(fam_model, fam_model.initial_state(), ids[:stop])
        seen.append(slots_showing(fam_model, state, layers, k, digits))
    return KeyInLens(document.key, blocks_after, *seen)

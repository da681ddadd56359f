"""Tokenising documents, whole or arriving in pieces.

``IncrementalTokenizer`` turns text that arrives in pieces into exactly the tokens of the whole
text: it tokenises the uncommitted tail and commits only tokens that end before a safe cut, a
word start (a token beginning with whitespace) at least ``HOLDBACK_CHARS`` characters before the
end of the text seen so far. Byte-level BPE splits text into pre-tokens at such word starts, so
later text cannot change tokens before them; the test suite checks equality on real documents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HOLDBACK_CHARS = 256


def adds_leading_special(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before a document (e.g. Llama's BOS); empty for SmolLM2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[-len(without) :] == without:
        return with_special[: len(with_special) - len(without)]
    return []


def tokenize_document(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a whole document and each token's (start, end) character span."""
    prefix = adds_leading_special(tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = prefix + list(encoded["input_ids"])
    offsets = [(0, 0)] * len(prefix) + [tuple(o) for o in encoded["offset_mapping"]]
    return ids, offsets


class IncrementalTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.text = ""
        self._committed_chars = 0  # text[:_committed_chars] is tokenised for good
        self._prefix = adds_leading_special(tokenizer)

    def push(self, piece: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Add text; returns the newly committed token ids and their spans in the whole text."""
        self.text += piece
        return self._commit(final=False)

    def flush(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Commit everything (end of document)."""
        return self._commit(final=True)

    def _commit(self, final: bool) -> tuple[list[int], list[tuple[int, int]]]:
        base = self._committed_chars
        tail = self.text[base:]
        if not tail or (not final and len(tail) <= 2 * HOLDBACK_CHARS):
            return [], []
        encoded = self.tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        if not final:
            limit = len(tail) - HOLDBACK_CHARS
            cut = None
            for index in range(len(ids) - 1, 0, -1):
                start = spans[index][0]
                if (
                    start <= limit
                    and start > spans[index - 1][0]
                    and tail[start : start + 1].isspace()
                    and not tail[start - 1 : start].isspace()
                ):
                    cut = index
                    break
            if cut is None:
                return [], []
            ids, spans = ids[:cut], spans[:cut]
            # what follows the last committed token (whitespace included) starts the next tail
            self._committed_chars = base + encoded["offset_mapping"][cut][0]
        else:
            self._committed_chars = len(self.text)
        prefix, self._prefix = self._prefix, []
        return prefix + ids, [(0, 0)] * len(prefix) + [(s + base, e + base) for s, e in spans]


def tokenize_prefix(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, piece_chars: int = 1 << 16
) -> tuple[list[int], list[tuple[int, int]]]:
    """The first ``max_tokens`` tokens of ``text`` (as tokenising the whole text gives them) and
    their character spans, without tokenising all of a huge document."""
    if len(text) <= piece_chars:
        ids, offsets = tokenize_document(tokenizer, text)
        return ids[:max_tokens], offsets[:max_tokens]
    incremental = IncrementalTokenizer(tokenizer)
    ids, offsets = [], []
    for start in range(0, len(text), piece_chars):
        new_ids, new_offsets = incremental.push(text[start : start + piece_chars])
        ids += new_ids
        offsets += new_offsets
        if len(ids) >= max_tokens:
            break
    else:
        new_ids, new_offsets = incremental.flush()
        ids += new_ids
        offsets += new_offsets
    return ids[:max_tokens], offsets[:max_tokens]

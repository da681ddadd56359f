"""Training examples for FAM fine-tuning, all generated or read on this machine (docs/algorithm.md §6).

An example is a token sequence with a loss weight per token (the weight of predicting that token
from the ones before it). Kinds:

``passkey``  the PassKey prompt (docs/algorithm.md §7, ``famviz.probes.passkey``) with a filler length drawn from a
             range, followed by its answer and the full stop that ends it; loss on those tokens only.
``copy``     the paper's memory incentive on long real text found on the machine (licences, package
             documentation): text, then ``"[repeat random segment]:"`` and ``copy_len`` consecutive
             tokens copied from earlier in the text, weight ``copy_weight`` (paper: 0.1); the text
             itself may carry a small next-token weight (``text_weight``) to keep language modelling.

Every draw comes from the ``random.Random`` passed in, so a saved RNG state reproduces the data.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.errors import ConfigError, DocumentError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from famviz.io.corpus import Corpus

COPY_MARKER = "\n[repeat random segment]:"
DATA_KINDS = ("passkey", "copy")
# Held out from the training text: the ordinary-text evaluation reads it.
HELD_OUT_TEXT = Path("/usr/share/common-licenses/GPL-3")
TEXT_ROOTS = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
MIN_TEXT_CHARS = 12_000


@dataclass
class Readout:
    """A side block asked after every block that ends at a position within ``[first, last]``: it reads the
    FAM the stream holds there (``FamModel.read_block``) and leaves the stream unchanged. For PassKey it is
    the question and the key, so one prompt teaches retention over every distance it spans."""

    ids: list[int]
    weights: list[float]  # as Example.weights, within the side block
    first: int  # token positions (tokens consumed) between which block ends are probed
    last: int

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.weights)


@dataclass
class Example:
    kind: str
    ids: list[int]
    weights: list[float]  # weights[i]: weight of the loss of predicting ids[i] from ids[:i]
    readout: Readout | None = None

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.weights)


def parse_mixture(spec: str) -> dict[str, float]:
    """``"passkey:0.8,copy:0.2"`` (or ``"passkey,copy"`` for equal parts) → normalised weights."""
    mixture: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        if name not in DATA_KINDS:
            raise ConfigError(f"unknown training data kind {name!r}; choose from {', '.join(DATA_KINDS)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"data weight of {name!r} must be a number, got {weight!r}") from None
        if value < 0:
            raise ConfigError(f"data weight of {name!r} must not be negative")
        mixture[name] = value
    total = sum(mixture.values())
    if not mixture or total <= 0:
        raise ConfigError(f"the data mixture {spec!r} selects nothing")
    return {name: value / total for name, value in mixture.items()}


def parse_range(spec: str, what: str) -> tuple[int, int]:
    """``"512-2048"`` or ``"1024"`` → (low, high)."""
    low, _, high = spec.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"{what} must look like 512-2048, got {spec!r}") from None
    if lo <= 0 or hi < lo:
        raise ConfigError(f"{what} must be a positive range low-high, got {spec!r}")
    return lo, hi


def find_text_files(
    roots: Iterable[Path] = TEXT_ROOTS, min_chars: int = MIN_TEXT_CHARS, held_out: Iterable[Path] = (HELD_OUT_TEXT,)
) -> list[Path]:
    """Long plain-text (or gzipped text) files on this machine, sorted for reproducibility."""
    held = {p.resolve() for p in held_out if p.exists()}
    files = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            try:
                if not path.is_file() or path.is_symlink() or path.resolve() in held:
                    continue
                size = path.stat().st_size
            except OSError:
                continue
            if path.suffix == ".gz":
                if size * 3 >= min_chars:
                    files.append(path)
            elif path.suffix in ("", ".txt", ".md", ".rst") and size >= min_chars:
                files.append(path)
    return files


def read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if b"\x00" in raw[:4096]:
        return ""
    return raw.decode("utf-8", errors="replace")


class MachineText:
    """The default training text: long text files found on this machine (``find_text_files``)."""

    def __init__(self, files: list[Path] | None = None):
        self.files = find_text_files() if files is None else list(files)
        if not self.files:
            raise ConfigError(
                "the copy task needs long text files on this machine; none found under "
                + ", ".join(str(r) for r in TEXT_ROOTS)
            )
        self.training = self.files

    def text(self, path: Path) -> str:
        return read_text(path)

    def describe(self) -> str:
        return "long text files under /usr/share/common-licenses and /usr/share/doc (GPL-3 held out)"


class TextCorpus:
    """Random windows of long text, tokenised on demand: the machine's documentation by default, or a
    researcher's own corpus (``famviz.io.corpus.Corpus``: its training split only).

    A window is cut from a random span of a document's characters (about 8 per token), so only that span is
    tokenised: a draw costs the same for a 500-page book as for a short file, and the cache holds texts
    (``cache_size`` documents), not token lists. Documents that cannot be read are skipped and counted
    (``unreadable``); documents once found long enough are remembered, so a corpus where few are long
    still gives every window.
    """

    CHARS_PER_TOKEN = 8  # a span this many characters per wanted token always holds enough tokens

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        files: list[Path] | None = None,
        cache_size: int = 64,
        documents: MachineText | Corpus | None = None,
    ):
        self.tokenizer = tokenizer
        self.documents = documents if documents is not None else MachineText(files)
        self._texts: dict = {}
        self._cache_size = cache_size
        self.unreadable: set = set()
        self._long: dict = {}  # document -> the longest window (tokens) it gave

    def text(self, ref: Path | int | np.integer) -> str:
        ref = ref if isinstance(ref, Path) else int(ref)  # a file, or a corpus document's index
        if ref not in self._texts:
            if len(self._texts) >= self._cache_size:
                self._texts.pop(next(iter(self._texts)))
            try:
                self._texts[ref] = self.documents.text(ref)
            except (DocumentError, OSError, UnicodeDecodeError):
                self.unreadable.add(ref)
                self._texts[ref] = ""
        return self._texts[ref]

    def _span_tokens(self, ref: Path | int | np.integer, rng: random.Random | None, length: int) -> list[int]:
        """The tokens of a span of the document long enough for ``length`` tokens (from its start
        without ``rng``); a span that starts inside the text loses its first, partial token."""
        text = self.text(ref)
        span = min(len(text), self.CHARS_PER_TOKEN * length + 64)
        begin = rng.randrange(len(text) - span + 1) if rng is not None and len(text) > span else 0
        ids = self.tokenizer(text[begin : begin + span], add_special_tokens=False)["input_ids"] if span else []
        return ids[1:] if begin else ids

    def window(self, rng: random.Random, length: int) -> list[int]:
        """``length`` consecutive tokens from a random training document long enough."""
        candidates = self.documents.training
        for attempt in range(100):
            known = [ref for ref, most in self._long.items() if most >= length]
            if attempt >= 20 and known:  # few documents are this long: draw among those seen to be
                ref = known[rng.randrange(len(known))]
            else:
                ref = candidates[rng.randrange(len(candidates))]
            ids = self._span_tokens(ref, rng, length)
            if len(ids) >= length:
                self._long[ref] = max(self._long.get(ref, 0), len(ids))
                start = rng.randrange(len(ids) - length + 1)
                return ids[start : start + length]
        raise ConfigError(
            f"no training document has {length} tokens; use shorter copy examples "
            f"(--copy-text-tokens) or longer documents"
        )

    def check_long_enough(self, length: int, scan: int = 200) -> None:
        """ConfigError unless one of the first ``scan`` training documents gives ``length`` tokens (the
        longest copy example), which ``window`` then always finds."""
        for ref in list(self.documents.training[:scan]):
            ids = self._span_tokens(ref, None, length)
            if len(ids) >= length:
                self._long[ref if isinstance(ref, Path) else int(ref)] = len(ids)
                return
        skipped = f"; {len(self.unreadable)} could not be read" if self.unreadable else ""
        raise ConfigError(f"the corpus's documents are shorter than one training sequence ({length} tokens){skipped}")


def copy_example(
    corpus: TextCorpus,
    rng: random.Random,
    text_tokens: int,
    copy_len: int,
    copy_weight: float = 0.1,
    text_weight: float = 0.0,
) -> Example:
    """Text, the copy marker, then ``copy_len`` tokens repeated from a random place in the text."""
    if copy_len > text_tokens:
        raise ConfigError(f"copy length {copy_len} is longer than the text ({text_tokens} tokens)")
    text = corpus.window(rng, text_tokens)
    marker = corpus.tokenizer(COPY_MARKER, add_special_tokens=False)["input_ids"]
    start = rng.randrange(text_tokens - copy_len + 1)
    segment = text[start : start + copy_len]
    ids = text + marker + segment
    weights = [0.0] + [text_weight] * (len(text) - 1) + [0.0] * len(marker) + [copy_weight] * len(segment)
    return Example("copy", ids, weights)


class ExampleStream:
    """Draws training examples from a mixture; all randomness comes from ``rng``."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mixture: dict[str, float],
        passkey_tokens: tuple[int, int],
        copy_text_tokens: tuple[int, int],
        copy_len: int,
        copy_weight: float,
        text_weight: float,
        passkey_depth_zero: float = 0.5,
        corpus: TextCorpus | None = None,
        readout_weight: float = 0.0,
        passkey_aligned: float = 0.0,
        block_size: int = 0,
    ):
        self.tokenizer = tokenizer
        self.mixture = mixture
        self.passkey_tokens = passkey_tokens
        self.copy_text_tokens = copy_text_tokens
        self.copy_len = copy_len
        self.copy_weight = copy_weight
        self.text_weight = text_weight
        self.passkey_depth_zero = passkey_depth_zero
        self.readout_weight = readout_weight  # 0: PassKey prompts carry no read-out probes
        self.passkey_aligned = passkey_aligned
        self.block_size = block_size
        self.corpus = corpus if corpus is not None or "copy" not in mixture else TextCorpus(tokenizer)

    def draw(self, rng: random.Random) -> Example:
        kinds = list(self.mixture)
        kind = rng.choices(kinds, weights=[self.mixture[k] for k in kinds])[0]
        if kind == "passkey":
            return self._passkey(rng, self._passkey_length(rng))
        length = rng.randint(*self.copy_text_tokens)
        return copy_example(self.corpus, rng, length, min(self.copy_len, length), self.copy_weight, self.text_weight)

    def _passkey_length(self, rng: random.Random) -> int:
        """Uniform in the range, or (with probability ``passkey_aligned``) a whole number of blocks minus
        0-6 tokens: then the answer starts in a new block, or crosses into one, and must be read from the
        FAM alone. Uniform lengths put the answer there only ~2% of the time, yet every round length
        (512, 2048, ...) of the evaluation does."""
        low, high = self.passkey_tokens
        length = rng.randint(low, high)
        block = self.block_size
        if block and rng.random() < self.passkey_aligned:
            fewest, most = max(1, -(-low // block)), high // block
            if fewest <= most:
                length = max(low, rng.randint(fewest, most) * block - rng.randint(0, 6))
        return length

    def _passkey(self, rng: random.Random, length: int) -> Example:
        from famviz.probes.passkey import make_passkey_document

        # The evaluation asks at depth 0 (the paper's setting); half the training prompts do too.
        depth = 0.0 if rng.random() < self.passkey_depth_zero else rng.random()
        document = make_passkey_document(self.tokenizer, length, depth=depth, seed=rng.randrange(2**31))
        prompt, answer = list(document.token_ids), list(document.answer_ids) + list(document.closing_ids)
        readout = None
        if self.readout_weight > 0:
            from famviz.probes.passkey import question_ids

            question = question_ids(self.tokenizer)
            # Probed from the block that holds the whole key sentence up to the last one before the question.
            readout = Readout(
                question + answer,
                [0.0] * len(question) + [self.readout_weight] * len(answer),
                first=document.key_span[1],
                last=document.question_start,
            )
        return Example("passkey", prompt + answer, [0.0] * len(prompt) + [1.0] * len(answer), readout)

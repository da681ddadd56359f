"""PassKey retrieval (docs/algorithm.md §7): documents, scoring, probes and length × depth sweeps.

The prompt is the Landmark Attention / TransformerFAM format, one part per line:

    <instruction>
    <filler before>  The pass key is K. Remember it. K is the pass key.  <filler after>
    What is the pass key? The pass key is

``make_passkey_document`` hits a target length in model tokens (within a few tokens) with the key
at a chosen depth of the filler (0: right after the instruction, the paper's setting; 1: right
before the question). ``make_document_probe`` does the same with a user's own text as the filler.

Answers are scored by their first integer. Probes never re-run the document: they fork the
stream's state (``famviz.core.decode``), so their cost is the question and answer only.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from famviz.core.config import MODES, FamConfig
from famviz.core.decode import BlockCursor, end_of_sequence_ids
from famviz.core.fam_model import FamModel, StreamState
from famviz.core.modes import MODE_TABLE
from famviz.core.tokenize import adds_leading_special, tokenize_document
from famviz.errors import DocumentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from famviz.core.engine import BlockResult, Stream
    from famviz.core.model import LoadedModel

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_MIN, KEY_MAX = 1, 50000
MAX_ANSWER_TOKENS = 10


def key_sentence(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def random_key(rng: random.Random) -> int:
    return rng.randint(KEY_MIN, KEY_MAX)


def keys_with_digits(digits: int) -> int:
    """How many possible keys (``KEY_MIN`` … ``KEY_MAX``) have ``digits`` digits."""
    low, high = max(KEY_MIN, 10 ** (digits - 1)), min(KEY_MAX, 10**digits - 1)
    return max(0, high - low + 1)


def chance_key_logprob(key: int | None = None) -> float:
    """log p of a uniform guess among the keys as long as ``key`` (all keys without one): the level a memory
    that knows only the key's length would reach, e.g. log(1/40,001) = -10.6 for a 5-digit key."""
    count = keys_with_digits(len(str(key))) if key is not None else KEY_MAX - KEY_MIN + 1
    return -math.log(max(count, 1))


def trial_rng(seed: int, *parts) -> random.Random:
    """A generator for one trial that depends only on the seed and the trial's coordinates."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


# -- documents ---------------------------------------------------------------------------------------
@dataclass
class PasskeyDocument:
    text: str  # the whole prompt, ending with the question
    key: int
    depth: float
    target_length: int
    token_ids: list[int]  # the whole prompt
    key_span: tuple[int, int]  # token indices [start, end) of the key sentence
    question_start: int  # token index where the question line starts (its newline included)
    answer_ids: list[int]  # tokens of " K" as the model would continue the prompt
    # The tokens that close the answer (" K" then these is " K."): training targets them too, because a
    # model never taught to end the number keeps writing digits and greedy scoring reads a wrong integer.
    closing_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def haystack_ids(self) -> list[int]:
        """The document without its question: what a live probe streams."""
        return self.token_ids[: self.question_start]


def _word_cut(text: str, chars: int) -> int:
    """The largest word boundary (a space position or the end) at or below ``chars``."""
    if chars >= len(text):
        return len(text)
    cut = text.rfind(" ", 0, chars + 1)
    return max(cut, 0)


def _assemble(filler: str, before: int, total: int, key: int, instruction: str) -> tuple[str, tuple[int, int]]:
    """The prompt with filler[:before] before the key and filler[before:total] after it, and the key
    sentence's character span."""
    head = filler[:before].strip()
    tail = filler[before:total].strip()
    parts = [instruction] + ([head] if head else [])
    prefix = "\n".join(parts) + "\n"
    sentence = key_sentence(key)
    text = prefix + sentence + ("\n" + tail if tail else "") + "\n" + QUESTION
    return text, (len(prefix), len(prefix) + len(sentence))


def _build(
    tokenizer: PreTrainedTokenizerBase,
    filler: str,
    length: int,
    depth: float,
    key: int,
    instruction: str,
    allow_short: bool,
) -> PasskeyDocument:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")

    def tokens_for(total: int) -> tuple[str, tuple[int, int], int]:
        total = _word_cut(filler, total)
        before = _word_cut(filler, int(round(depth * total)))
        text, span = _assemble(filler, before, total, key, instruction)
        return (
            text,
            span,
            len(adds_leading_special(tokenizer)) + len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        )

    # Token count grows monotonically (up to a token or two) with the filler's length: bisect on characters.
    low, high = 0, len(filler)
    text, span, count = tokens_for(high)
    if count < length and not allow_short:
        raise DocumentError(f"the filler is too short for {length} tokens (it gives {count})")
    if count > length:
        text, span, count = tokens_for(0)
        if count > length:
            raise ValueError(f"length {length} is shorter than the prompt without filler ({count} tokens)")
        while high - low > 1:
            middle = (low + high) // 2
            candidate = tokens_for(middle)
            if candidate[2] <= length:
                low, (text, span, count) = middle, candidate
            else:
                high = middle
    ids, offsets = tokenize_document(tokenizer, text)
    key_tokens = [i for i, (s, e) in enumerate(offsets) if e > span[0] and s < span[1]]
    question_char = len(text) - len(QUESTION) - 1  # its newline
    question_start = next(i for i, (s, e) in enumerate(offsets) if s >= question_char and e > s)
    prompt_len = len(ids) - len(adds_leading_special(tokenizer))
    answer_ids = tokenizer(text + f" {key}", add_special_tokens=False)["input_ids"][prompt_len:]
    closed = tokenizer(text + f" {key}.", add_special_tokens=False)["input_ids"][prompt_len:]
    closing_ids = closed[len(answer_ids) :] if closed[: len(answer_ids)] == answer_ids else []
    return PasskeyDocument(
        text=text,
        key=key,
        depth=depth,
        target_length=length,
        token_ids=ids,
        key_span=(key_tokens[0], key_tokens[-1] + 1),
        question_start=question_start,
        answer_ids=answer_ids,
        closing_ids=closing_ids,
    )


def repeated_filler(chars: int) -> str:
    """At least ``chars`` characters of the PassKey filler, whole sentences."""
    return " ".join([FILLER] * (chars // (len(FILLER) + 1) + 2))


def make_passkey_document(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float = 0.0,
    seed: int | None = None,
    key: int | None = None,
    rng: random.Random | None = None,
) -> PasskeyDocument:
    """The standard PassKey prompt of ``length`` tokens (± a few) with the key at ``depth``."""
    if key is None:
        key = random_key(rng or random.Random(seed))
    # About 4.6 characters per filler token for Llama-style BPE; twice that is always enough.
    return _build(tokenizer, repeated_filler(10 * length + 200), length, depth, key, INSTRUCTION, allow_short=False)


def make_document_probe(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    depth: float = 0.0,
    length: int | None = None,
    seed: int | None = None,
    key: int | None = None,
) -> PasskeyDocument:
    """The key sentence hidden at ``depth`` of the user's own text (cut to ``length`` tokens if given)."""
    filler = " ".join(text.split())  # one line: the prompt's own line structure stays intact
    if not filler:
        raise DocumentError("the document has no text to hide a key in")
    if key is None:
        key = random_key(random.Random(seed))
    return _build(tokenizer, filler, length or 10**9, depth, key, INSTRUCTION, allow_short=True)


# -- scoring -----------------------------------------------------------------------------------------
_INTEGER = re.compile(r"\d+")


def first_integer(answer: str) -> int | None:
    match = _INTEGER.search(answer)
    return int(match.group()) if match else None


def score_answer(answer: str, key: int) -> bool:
    """The first integer in the answer must equal the key (docs/algorithm.md §7)."""
    return first_integer(answer) == key


def _integer_closed(text: str) -> bool:
    """True once the answer's first integer can no longer change (digits followed by a non-digit)."""
    match = _INTEGER.search(text)
    return bool(match) and match.end() < len(text)


# -- probing a state ---------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    answer: str
    predicted: int | None
    correct: bool
    key_logprob: float  # log p(" K" | document, question), summed over the key's tokens
    seconds: float


def answer_question(
    fam_model: FamModel,
    cursor: BlockCursor,
    question_ids: Sequence[int],
    key: int,
    answer_ids: Sequence[int],
    max_new_tokens: int = MAX_ANSWER_TOKENS,
) -> ProbeResult:
    """Feed the question on a fork of ``cursor``, greedy-decode the answer and score the key's log-prob."""
    started = time.perf_counter()
    tokenizer = fam_model.loaded.tokenizer
    # One pass over the question and the key: the key's log-probability, and (speculatively) the greedy
    # answer for as long as it agrees with the key. Decoding continues token by token only after a
    # disagreement, so a correct answer costs one pass; the answer is exactly the greedy one either way.
    asked = cursor.fork()
    draft = list(answer_ids)
    logits = asked.extend([*question_ids, *draft])
    after_question = logits[len(question_ids) - 1 :]  # row i: the prediction after draft[:i]
    logprobs = torch.log_softmax(after_question[: len(draft)], dim=-1)
    key_logprob = float(logprobs.gather(1, torch.tensor(draft).unsqueeze(1)).sum())
    out = _speculative_greedy(
        cursor,
        list(question_ids),
        asked,
        draft,
        after_question,
        max_new_tokens,
        stop=lambda ids: _integer_closed(tokenizer.decode(ids)),
    )
    answer = tokenizer.decode(out)
    predicted = first_integer(answer)
    return ProbeResult(
        answer=answer,
        predicted=predicted,
        correct=predicted == key,
        key_logprob=key_logprob,
        seconds=time.perf_counter() - started,
    )


def _speculative_greedy(
    base: BlockCursor,
    prompt: list[int],
    fed: BlockCursor,
    draft: list[int],
    draft_logits: torch.Tensor,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool],
) -> list[int]:
    """Greedy decoding after ``prompt`` on ``base``; ``fed`` is ``base`` fed prompt + draft, with the
    draft's logits (row i predicts the token after draft[:i])."""
    eos = end_of_sequence_ids(base.fam_model)
    out: list[int] = []
    for row in draft_logits:
        token = int(row.argmax())
        if token in eos:
            return out
        out.append(token)
        if len(out) == max_new_tokens or stop(out):
            return out
        if len(out) > len(draft) or token != draft[len(out) - 1]:
            break  # the answer left the draft: go on from the cursor just before the disagreement
    else:
        return out  # unreachable: the draft's last row always decides a token
    accepted = len(out) - 1
    resumed = fed.rewound(len(draft) - accepted)
    if resumed is None:  # the draft crossed a block boundary: replay prompt and answer so far
        resumed = base.fork()
        logits = resumed.extend(prompt + out)[-1]
    else:
        logits = resumed.extend([out[-1]])[-1]
    return out + resumed.greedy(logits, max_new_tokens - len(out), stop=lambda ids: stop(out + ids))


def question_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer("\n" + QUESTION, add_special_tokens=False)["input_ids"]


def answer_ids_for(tokenizer: PreTrainedTokenizerBase, key: int) -> list[int]:
    return tokenizer(f" {key}", add_special_tokens=False)["input_ids"]


def live_probe(
    fam_model: FamModel,
    state: StreamState,
    key: int,
    pending: Sequence[int] = (),
    max_new_tokens: int = MAX_ANSWER_TOKENS,
) -> ProbeResult:
    """Ask for the key from a stream's ``state`` (plus its ``pending`` tokens) without touching it."""
    tokenizer = fam_model.loaded.tokenizer
    cursor = BlockCursor(fam_model, state)
    if pending:
        cursor.extend(pending)
    return answer_question(
        fam_model, cursor, question_ids(tokenizer), key, answer_ids_for(tokenizer, key), max_new_tokens
    )


# -- running prompts -------------------------------------------------------------------------------
@torch.inference_mode()
def advance(fam_model: FamModel, state: StreamState, token_ids: Sequence[int]) -> StreamState:
    """Run whole blocks of ``token_ids`` (a multiple of the block size) from ``state``."""
    block = fam_model.config.block_size
    if len(token_ids) % block:
        raise ValueError("advance takes whole blocks only")
    for start in range(0, len(token_ids), block):
        out = fam_model.forward_block(torch.tensor([token_ids[start : start + block]]), state)
        state = out.state
    return state


def ask(
    fam_model: FamModel,
    document: PasskeyDocument,
    state: StreamState | None = None,
    done: int = 0,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    skip_unseen: bool = True,
) -> ProbeResult:
    """Answer one PassKey prompt; ``state`` (after ``done`` tokens of it, a block boundary) skips its start.

    ``skip_unseen``: BSWA without memory carries nothing from block to block, so only the last block is
    run (the answer is identical; set False to run every block, e.g. to test the window mask).
    """
    block = fam_model.config.block_size
    haystack = document.haystack_ids
    full_end = (len(haystack) // block) * block
    if skip_unseen and fam_model.blocks_independent:
        state, done = replace(fam_model.initial_state(), position=full_end), full_end
    state = advance(fam_model, state or fam_model.initial_state(), haystack[done:full_end])
    cursor = BlockCursor(fam_model, state)
    if full_end < len(haystack):
        cursor.extend(haystack[full_end:])
    return answer_question(
        fam_model,
        cursor,
        document.token_ids[document.question_start :],
        document.key,
        document.answer_ids,
        max_new_tokens,
    )


def shared_prefix_blocks(token_lists: Sequence[Sequence[int]], block: int) -> int:
    """Tokens (a whole number of blocks) that every list starts with, stopping before any question."""
    shortest = min(len(ids) for ids in token_lists)
    same = 0
    while same < shortest and all(ids[same] == token_lists[0][same] for ids in token_lists):
        same += 1
    return (same // block) * block


# -- live retention probe ------------------------------------------------------------------------------
@dataclass
class RetentionPoint:
    block: int  # index of the block just finished
    tokens: int  # tokens streamed so far
    blocks_since_key: int  # finished blocks since the one that held the key's last token
    correct: bool
    predicted: int | None
    key_logprob: float
    seconds: float


class RetentionProbe:
    """Probe a running ``Stream`` for the key after every ``every`` blocks (pass as its ``on_block``).

    Each probe forks the stream's state, asks the question and decodes the answer; the stream goes
    on from its own, unforked state. Points are kept in ``points`` and passed to ``on_point``.
    """

    def __init__(
        self, key: int, key_end: int, every: int = 1, on_point: Callable[[RetentionPoint], None] | None = None
    ):
        if every < 1:
            raise ValueError("probe interval must be at least 1 block")
        self.key, self.key_end, self.every = key, key_end, every
        self.on_point = on_point
        self.points: list[RetentionPoint] = []
        self.stream = None  # set by attach()
        self._key_block: int | None = None

    def attach(self, stream: Stream) -> RetentionProbe:
        self.stream = stream
        previous = stream.on_block

        def on_block(result: BlockResult) -> None:
            if previous is not None:
                previous(result)
            self(result)

        stream.on_block = on_block
        return self

    def __call__(self, block_result: BlockResult) -> None:
        stream = self.stream
        end = block_result.start + len(block_result.token_ids)
        if end < self.key_end:
            return
        if self._key_block is None:
            self._key_block = block_result.index
        since = block_result.index - self._key_block
        if since % self.every:
            return
        probe = live_probe(stream.fam_model, stream.state, self.key)
        point = RetentionPoint(
            block=block_result.index,
            tokens=end,
            blocks_since_key=since,
            correct=probe.correct,
            predicted=probe.predicted,
            key_logprob=probe.key_logprob,
            seconds=probe.seconds,
        )
        self.points.append(point)
        if self.on_point is not None:
            self.on_point(point)


def retention_curve(
    fam_model: FamModel,
    document: PasskeyDocument,
    every: int = 1,
    on_point: Callable[[RetentionPoint], None] | None = None,
) -> list[RetentionPoint]:
    """Stream a PassKey document's haystack and probe the memory after every ``every`` blocks."""
    from famviz.core.engine import Stream

    stream = Stream(fam_model, record=False)
    probe = RetentionProbe(document.key, document.key_span[1], every, on_point).attach(stream)
    stream.run(document.haystack_ids)
    return probe.points


# -- sweeps ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeSpec:
    """One column of a sweep: a mode with its own memory, e.g. ``bswa:1`` = bswa with mem_blocks 1."""

    mode: str
    mem_blocks: int

    @property
    def label(self) -> str:
        return MODE_TABLE[self.mode].describe(self.mem_blocks)

    @classmethod
    def parse(cls, text: str, default_mem_blocks: int) -> ModeSpec:
        mode, _, mem = text.strip().partition(":")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (use {', '.join(MODES)}, optionally with :MEM_BLOCKS)")
        try:
            mem_blocks = int(mem) if mem else default_mem_blocks
        except ValueError:
            raise ValueError(f"memory blocks in {text!r} must be an integer") from None
        if mem_blocks < 0:
            raise ValueError(f"memory blocks in {text!r} must be >= 0")
        return cls(mode, mem_blocks)


@dataclass
class TrialResult:
    mode: str
    mem_blocks: int
    length: int
    depth: float
    trial: int
    key: int
    tokens: int
    answer: str
    predicted: int | None
    correct: bool
    key_logprob: float


@dataclass
class CellResult:
    mode: str
    mem_blocks: int
    label: str
    length: int
    depth: float
    trials: int
    accuracy: float
    mean_key_logprob: float
    seconds: float
    results: list[TrialResult] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("results")
        return out


def trial_documents(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, trials: int, seed: int, text: str | None = None
) -> list[PasskeyDocument]:
    """The documents of one sweep cell; the same for every mode, so modes answer the same keys.
    With ``text``, the key is hidden in that text (cut to ``length``) instead of the standard filler."""
    keys = [random_key(trial_rng(seed, length, depth, t)) for t in range(trials)]
    if text is None:
        return [make_passkey_document(tokenizer, length, depth, key=key) for key in keys]
    return [make_document_probe(tokenizer, text, depth, length, key=key) for key in keys]


def iter_trials(
    fam_model: FamModel, documents: Sequence[PasskeyDocument], spec: ModeSpec, skip_unseen: bool = True
) -> Iterator[TrialResult]:
    """The trials of one cell, one at a time. The start they share (the same filler before the key)
    runs once and is forked."""
    block = fam_model.config.block_size
    shared = shared_prefix_blocks([d.haystack_ids for d in documents], block)
    if skip_unseen and fam_model.blocks_independent:
        shared = 0  # ask() runs the last block only
    state = advance(fam_model, fam_model.initial_state(), documents[0].token_ids[:shared])
    for index, document in enumerate(documents):
        probe = ask(fam_model, document, state, shared, skip_unseen=skip_unseen)
        yield TrialResult(
            mode=spec.mode,
            mem_blocks=spec.mem_blocks,
            length=document.target_length,
            depth=document.depth,
            trial=index,
            key=document.key,
            tokens=document.length,
            answer=probe.answer,
            predicted=probe.predicted,
            correct=probe.correct,
            key_logprob=probe.key_logprob,
        )


def summarise_cell(spec: ModeSpec, results: Sequence[TrialResult], seconds: float) -> CellResult:
    """A cell's accuracy and mean key log-prob over the trials done so far."""
    return CellResult(
        mode=spec.mode,
        mem_blocks=spec.mem_blocks,
        label=spec.label,
        length=results[0].length,
        depth=results[0].depth,
        trials=len(results),
        accuracy=float(np.mean([r.correct for r in results])),
        mean_key_logprob=float(np.mean([r.key_logprob for r in results])),
        seconds=seconds,
        results=list(results),
    )


def run_cell(
    fam_model: FamModel,
    documents: Sequence[PasskeyDocument],
    spec: ModeSpec,
    on_trial: Callable[[TrialResult], None] | None = None,
    skip_unseen: bool = True,
) -> CellResult:
    """All trials of one cell."""
    started = time.perf_counter()
    results = []
    for result in iter_trials(fam_model, documents, spec, skip_unseen):
        results.append(result)
        if on_trial is not None:
            on_trial(result)
    return summarise_cell(spec, results, time.perf_counter() - started)


def sweep_config(base: FamConfig, spec: ModeSpec) -> FamConfig:
    """The run of one sweep column: ``base``'s geometry in the column's mode and memory (no FAM slots in a mode
    without a FAM)."""
    return base.in_mode(spec.mode, mem_blocks=spec.mem_blocks)


SweepDocuments = dict[tuple[int, float], list[PasskeyDocument]]


def sweep_documents(
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int,
    text: str | None = None,
) -> SweepDocuments:
    """Every cell's documents, keyed (length, depth); built before a sweep starts, so bad sizes fail at once."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    return {(n, d): trial_documents(tokenizer, n, d, trials, seed, text) for n in lengths for d in depths}


@dataclass(frozen=True)
class SweepStep:
    """One trial of a sweep as it finishes: the trial, its cell's summary so far, and whether the cell is done."""

    spec: ModeSpec
    trial: TrialResult
    cell: CellResult
    cell_done: bool


def iter_sweep(
    loaded: LoadedModel,
    specs: Sequence[ModeSpec],
    documents: SweepDocuments,
    base: FamConfig | None = None,
    fam_prompt: torch.Tensor | None = None,
    backend: str = "sdpa",
    skip_unseen: bool = True,
) -> Iterator[SweepStep]:
    """The PassKey sweep, trial by trial: every mode column over every (length, depth) cell of ``documents``
    (the same keys for every mode). The CLI, ``evaluate`` and the app consume it; stopping early is
    closing the generator."""
    base = base or FamConfig()
    for spec in specs:
        # FamModel uses the FAM prompt only where the mode has a FAM.
        fam_model = FamModel(loaded, sweep_config(base, spec), fam_prompt=fam_prompt, backend=backend)
        for docs in documents.values():
            results: list[TrialResult] = []
            started = time.perf_counter()
            for trial in iter_trials(fam_model, docs, spec, skip_unseen):
                results.append(trial)
                cell = summarise_cell(spec, results, time.perf_counter() - started)
                yield SweepStep(spec, trial, cell, cell_done=len(results) == len(docs))


def sweep(
    loaded: LoadedModel,
    specs: Sequence[ModeSpec],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    base: FamConfig | None = None,
    fam_prompt: torch.Tensor | None = None,
    backend: str = "sdpa",
    skip_unseen: bool = True,
) -> list[CellResult]:
    """Accuracy and key log-prob for every (mode, length, depth); seeded, so runs are reproducible."""
    documents = sweep_documents(loaded.tokenizer, lengths, depths, trials, seed)
    steps = iter_sweep(loaded, specs, documents, base, fam_prompt, backend, skip_unseen)
    return [step.cell for step in steps if step.cell_done]


def accuracy_grid(cells: Iterable[CellResult]) -> dict[str, tuple[list[int], list[float], np.ndarray]]:
    """Per mode label: lengths, depths and the (lengths × depths) accuracy array (NaN where not run)."""
    by_label: dict[str, dict[tuple[int, float], float]] = {}
    for cell in cells:
        by_label.setdefault(cell.label, {})[(cell.length, cell.depth)] = cell.accuracy
    grids = {}
    for label, values in by_label.items():
        lengths = sorted({k[0] for k in values})
        depths = sorted({k[1] for k in values})
        grid = np.full((len(lengths), len(depths)), math.nan)
        for (length, depth), accuracy in values.items():
            grid[lengths.index(length), depths.index(depth)] = accuracy
        grids[label] = (lengths, depths, grid)
    return grids

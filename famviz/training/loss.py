"""The training loss: whole sequences streamed block by block with backpropagation through every block
(no stop-gradient on the FAM), weighted next-token loss, and PassKey read-out probes asked of the FAM after
blocks; and the held-out PassKey score used during training (teacher-forced, cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from famviz.core.fam_model import FamModel, StreamState
from famviz.training.data import Example
from famviz.training.rpo_rsp import initial_training_state

if TYPE_CHECKING:
    from collections.abc import Iterator

    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def weighted_predictions(
    fam_model: FamModel,
    ids: torch.Tensor,
    weights: torch.Tensor,
    state: StreamState,
    skip_unseen: bool = True,
    window_kv: list | None = None,
) -> Iterator[tuple[StreamState, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]]:
    """Stream whole sequences block by block; per block, yield the next state and, when any prediction in
    the block is weighted, (final-norm hidden rows, targets, weights) of those predictions only.

    ``weights[b, i]`` weighs predicting ``ids[b, i]`` (position i-1 predicts token i).
    ids: (batch, n) long; weights: (batch, n); the yielded rows are (k, d), targets and weights (k,)
    for the block's k weighted predictions.
    ``skip_unseen``: when blocks are independent (BSWA without memory), a block with no weighted
    prediction affects nothing and is not run (losses and gradients are identical).
    ``window_kv``: when a list is given, it holds the block's per-layer window keys and values
    (``FamModel.forward_block``) at each yield.
    """
    block = fam_model.config.block_size
    target_mask = weights[:, 1:] > 0
    skip = skip_unseen and fam_model.blocks_independent
    for start in range(0, ids.shape[1], block):
        n = min(block, ids.shape[1] - start)
        mask = target_mask[:, start : start + n]
        mask = F.pad(mask, (0, n - mask.shape[1]))  # the last position of a sequence predicts nothing
        if skip and not mask.any():
            state = replace(state, position=state.position + n)
            yield state, None
            continue
        if window_kv is not None:
            window_kv.clear()
        out = fam_model.forward_block(ids[:, start : start + block], state, window_kv=window_kv)
        state = out.state
        if not mask.any():
            yield state, None
            continue
        targets = ids[:, start + 1 : start + n + 1]
        w = weights[:, start + 1 : start + n + 1]
        targets = F.pad(targets, (0, n - targets.shape[1]))[mask]
        w = F.pad(w, (0, n - w.shape[1]))[mask]
        yield state, (out.hidden[mask], targets, w)


@dataclass
class ReadoutBatch:
    """The read-out probes of a batch (``famviz.training.data.Readout``), right-padded; rows without one never match."""

    ids: torch.Tensor  # (batch, P)
    weights: torch.Tensor  # (batch, P)
    first: torch.Tensor  # (batch,) long: block ends within [first, last] are probed
    last: torch.Tensor


@dataclass(frozen=True)
class LossParts:
    """The parts of a step's loss, as sums and counts so that processes can add theirs: the weighted NLL of
    the stream's own predictions ("main") and of the read-out probes (learned at different rates), and the
    FAM's growth per counted update (``FamGrowth``, measured whatever its weight in the loss)."""

    main_sum: float = 0.0
    main_count: int = 0
    probe_sum: float = 0.0
    probe_count: int = 0
    growth_sum: float = 0.0
    growth_count: int = 0

    @property
    def main(self) -> float:
        return self.main_sum / max(self.main_count, 1)

    @property
    def readout(self) -> float | None:
        return self.probe_sum / self.probe_count if self.probe_count else None

    @property
    def fam_growth(self) -> float | None:
        return self.growth_sum / self.growth_count if self.growth_count else None


@dataclass(frozen=True)
class SequenceLoss:
    """``sequence_loss``'s result. ``loss`` is Σ w·nll / #(w > 0) over the stream's predictions and the
    probes, plus ``penalty`` (λ · the mean FAM growth; ``penalty_sum`` is λ · the growths' sum, so that a
    multi-process step can average it over every process's updates apart from the tokens)."""

    loss: torch.Tensor
    state: StreamState  # after the last block
    count: int  # weighted predictions, probes included
    parts: LossParts
    penalty: torch.Tensor
    penalty_sum: torch.Tensor


@dataclass
class _ProbeQuestions:
    """How the read-out probes of a batch are asked of the stream's state at a block end (``sequence_loss``)."""

    fam_model: FamModel
    ids: torch.Tensor  # the stream's tokens (for the fill before a split question)
    readout: ReadoutBatch
    start: int  # the stream's position at its first token
    offset: int
    split: int
    fill: int

    def ask(self, at: StreamState, asked: torch.Tensor, next_block_kv: list | None = None) -> tuple[torch.Tensor, int]:
        """The weighted NLL sum and count of the probes asked of rows ``asked`` at the block end ``at``;
        ``next_block_kv``: the window keys and values of the block run after ``at``, whose first rows a
        filled question shares."""
        fam_model, readout, split, fill = self.fam_model, self.readout, self.split, self.fill
        w = readout.weights[:, 1:] * asked.unsqueeze(1)
        mask = w > 0
        if split:
            if next_block_kv is not None:
                asked_block = fam_model.finish_block(readout.ids[:, :split], at, next_block_kv, fill)
                question_rows = asked_block.hidden
            else:
                end = at.position - self.start
                question = torch.cat([self.ids[:, end : end + fill], readout.ids[:, :split]], dim=1)
                asked_block = fam_model.forward_block(question, at)
                question_rows = asked_block.hidden[:, fill:]
            rest = fam_model.read_block(readout.ids[:, split:], asked_block.state)
            hidden = torch.cat([question_rows, rest], dim=1)[:, :-1]
        else:
            hidden = fam_model.read_block(readout.ids, at, self.offset)[:, :-1]
        nll = fam_model.target_nll(hidden[mask], readout.ids[:, 1:][mask])
        return (nll * w[mask]).sum(), int(mask.sum())


def sequence_loss(
    fam_model: FamModel,
    ids: torch.Tensor,
    weights: torch.Tensor,
    state: StreamState,
    skip_unseen: bool = True,
    readout: ReadoutBatch | None = None,
    readout_offset: int = 0,
    readout_split: int = 0,
    readout_fill: int = 0,
    fam_growth_weight: float = 0.0,
) -> SequenceLoss:
    """Weighted next-token loss of whole sequences streamed block by block, and the final state.

    With ``readout``, after every block whose end lies within a row's [first, last], the row's probe is
    run as a side block on the state there (``FamModel.read_block``, its rows at ``readout_offset`` in the
    block) and its weighted predictions join the loss; the stream itself is unchanged by it.
    ``readout_split`` > 0: each probe is asked across a block boundary instead, as at a round prompt
    length: its first ``readout_split`` tokens (the question, maybe the answer's start) run as a block of
    their own that updates the FAM, and the rest is read from that FAM alone at the start of the next
    block (``readout_offset`` is then unused).
    ``readout_fill`` f > 0 (with a split): the question's block starts with the stream's own next f tokens,
    so that the FAM update that must keep the key also reads a block of text, as at a round prompt length
    (the question ends a full block). Rows whose next f tokens reach their question are not asked there.
    ``fam_growth_weight`` λ > 0 adds λ · ``fam_growth`` (see ``FamGrowth``) to the loss: over many updates
    the FAM, a residual stream fed back into itself, otherwise grows about linearly with the block count.
    ids: (batch, n) long; weights: (batch, n).
    """
    main_sum = torch.zeros((), device=fam_model.device)
    probe_sum = torch.zeros((), device=fam_model.device)
    main_count = int((weights[:, 1:] > 0).sum())
    probe_count = 0
    start, block = state.position, fam_model.config.block_size
    growth = FamGrowth(track_gradient=fam_growth_weight > 0)
    questions = None
    if readout is not None:
        questions = _ProbeQuestions(fam_model, ids, readout, start, readout_offset, readout_split, readout_fill)
    # A filled question block starts with the next block's first tokens: asked once that block has run, it
    # shares their rows (FamModel.finish_block) instead of computing them again.
    shared = bool(readout is not None and readout_split and readout_fill and fam_model.can_finish_blocks)
    window_kv: list | None = [] if shared else None
    waiting: tuple[StreamState, torch.Tensor] | None = None  # (state at a block end, rows asked there)
    for state, scored in weighted_predictions(fam_model, ids, weights, state, skip_unseen, window_kv):  # noqa: B020 - each block's state replaces the one before
        # A row's update counts when its block holds or precedes something weighted (padding comes after).
        block_start = (state.position - start - 1) // block * block
        growth.update(state.fam, (weights[:, block_start:] > 0).any(dim=1))
        if waiting is not None:  # the block just run is the one the waiting question block begins with
            nll_sum, n = questions.ask(*waiting, next_block_kv=window_kv)
            probe_sum, probe_count, waiting = probe_sum + nll_sum, probe_count + n, None
        if scored is not None:
            rows, targets, w = scored
            main_sum = main_sum + (fam_model.target_nll(rows, targets) * w).sum()
        if questions is not None:
            end = state.position - start
            asked = (readout.first <= end) & (end + readout_fill <= readout.last)
            if asked.any():
                if shared:
                    waiting = (state, asked)  # end + fill ≤ last: the next block holds the fill
                else:
                    nll_sum, n = questions.ask(state, asked)
                    probe_sum, probe_count = probe_sum + nll_sum, probe_count + n
    if waiting is not None:  # a probe row whose question lies past the sequence's end (no next block)
        nll_sum, n = questions.ask(*waiting)
        probe_sum, probe_count = probe_sum + nll_sum, probe_count + n
    zero = torch.zeros((), device=fam_model.device)
    penalty_sum = fam_growth_weight * growth.total if fam_growth_weight > 0 and growth.count else zero
    penalty = penalty_sum / max(growth.count, 1)
    parts = LossParts(
        main_sum=float(main_sum.detach()),
        main_count=main_count,
        probe_sum=float(probe_sum.detach()),
        probe_count=probe_count,
        growth_sum=float(growth.total.detach()) if growth.count else 0.0,
        growth_count=growth.count,
    )
    count = main_count + probe_count
    loss = (main_sum + probe_sum) / max(count, 1) + penalty
    return SequenceLoss(loss, state, count, parts, penalty, penalty_sum)


class FamGrowth:
    """The FAM's norm growth over a stream: the mean, over every row's updates after the first, of the mean
    over layers of max(0, log n_t − log n_(t−1)), n_t the row's mean FAM-slot L2 norm in a layer after t
    updates. Only updates of rows marked valid count (a padded row's blocks past its end do not).

    The first update is left out: it starts from the learned prompt (or a passed state), whose scale is not
    a memory's. A norm that doubles over 60 updates grows 0.012 per update; the linear growth seen after
    64 blocks of text (45×) is about 0.06. Without ``track_gradient`` the norms are measured detached.
    """

    def __init__(self, track_gradient: bool):
        self.track_gradient = track_gradient
        self.previous: torch.Tensor | None = None  # (layers, batch) log norms after the last update
        self.total: torch.Tensor = torch.zeros(())  # sum of the counted rows' growths
        self.count = 0  # (row, update) pairs counted

    def update(self, fam: tuple[torch.Tensor, ...], valid: torch.Tensor) -> None:
        """After an update: ``fam`` per layer (batch, slots, d); ``valid`` (batch,) bool, rows that count."""
        if not fam:
            return
        with torch.set_grad_enabled(self.track_gradient and torch.is_grad_enabled()):
            log_norm = torch.stack([f.float().norm(dim=-1).mean(dim=-1) for f in fam]).log()
            if self.previous is not None:
                valid = valid.to(log_norm.device)
                growth = torch.relu(log_norm - self.previous).mean(dim=0)  # (batch,): mean over layers
                self.total = self.total.to(growth.device) + growth[valid].sum()
                self.count += int(valid.sum())
            self.previous = log_norm


def global_parts(accelerator: Accelerator, parts: LossParts) -> LossParts:
    """A step's loss parts summed over every process's tokens and FAM updates (the log's loss_main,
    loss_readout and fam_growth are their means)."""
    names = [f.name for f in fields(LossParts)]
    values = torch.tensor([float(getattr(parts, n)) for n in names], device=accelerator.device)
    totals = accelerator.reduce(values, reduction="sum").tolist()
    return LossParts(**{n: int(t) if n.endswith("_count") else t for n, t in zip(names, totals, strict=True)})


def collate(
    examples: list[Example], pad_id: int, device: torch.device | str, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, ReadoutBatch | None]:
    """Right-pad a batch (pad tokens carry no loss and come after everything that does), and its probes;
    to ``length`` tokens when given (a process's slice is padded like the whole global batch)."""
    length = max(max(len(e.ids) for e in examples), length or 0)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    weights = torch.zeros(len(examples), length)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = torch.tensor(example.ids)
        weights[row, : len(example.weights)] = torch.tensor(example.weights)
    readout = None
    probes = [e.readout for e in examples]
    if any(p is not None for p in probes):
        width = max(len(p.ids) for p in probes if p is not None)
        readout = ReadoutBatch(
            ids=torch.full((len(examples), width), pad_id, dtype=torch.long),
            weights=torch.zeros(len(examples), width),
            first=torch.full((len(examples),), 1, dtype=torch.long),
            last=torch.zeros(len(examples), dtype=torch.long),
        )  # first > last: never asked
        for row, probe in enumerate(probes):
            if probe is not None:
                readout.ids[row, : len(probe.ids)] = torch.tensor(probe.ids)
                readout.weights[row, : len(probe.weights)] = torch.tensor(probe.weights)
                readout.first[row], readout.last[row] = probe.first, probe.last
        readout = ReadoutBatch(*(t.to(device) for t in (readout.ids, readout.weights, readout.first, readout.last)))
    return ids.to(device), weights.to(device), readout


# -- held-out evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def passkey_teacher_forced(
    fam_model: FamModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: torch.Tensor | None,
    length: int,
    trials: int,
    seed: int,
    depth: float = 0.0,
) -> dict:
    """Held-out PassKey prompts scored teacher-forced: a trial counts when every key token and the token
    that ends the number are the argmax (so a model that keeps writing digits fails, as greedy scoring does).

    Cheap enough to run during training; ``famviz.probes.passkey`` scores by greedy decoding for the report.
    """
    from famviz.probes.passkey import make_passkey_document

    hits, logprobs = 0, []
    for trial in range(trials):
        document = make_passkey_document(tokenizer, length, depth=depth, seed=seed + trial)
        answer = list(document.answer_ids) + list(document.closing_ids)
        start, key_end = len(document.token_ids), len(document.token_ids) + len(document.answer_ids)
        ids = torch.tensor([list(document.token_ids) + answer], device=fam_model.device)
        state = initial_training_state(fam_model, 1, prompt, None)
        weights = torch.zeros_like(ids, dtype=torch.float32)
        weights[0, start:] = 1.0
        hit, logprob = _score_tokens(fam_model, ids, weights, state)  # one entry per answer token
        correct, lp = bool(hit.all()), float(logprob[: key_end - start].sum())
        hits += int(correct)
        logprobs.append(lp)
    return {
        "length": length,
        "depth": depth,
        "trials": trials,
        "accuracy": hits / max(trials, 1),
        "key_logprob": sum(logprobs) / max(len(logprobs), 1),
    }


def _score_tokens(
    fam_model: FamModel, ids: torch.Tensor, weights: torch.Tensor, state: StreamState
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each weighted token in order: whether it is the argmax, and its log-probability."""
    hits, logprobs = [], []
    for _, scored in weighted_predictions(fam_model, ids, weights, state):
        if scored is not None:
            rows, targets, _ = scored
            logits = fam_model.logits(rows)
            hits.append(logits.argmax(-1) == targets)
            logprobs.append(-F.cross_entropy(logits.float(), targets, reduction="none"))
    return torch.cat(hits), torch.cat(logprobs)

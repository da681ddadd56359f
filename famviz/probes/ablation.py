"""Where the memory keeps what it knows: causal interventions on the FAM.

Attention shares say where a query looks; interventions say what the memory is used for. For a prompt
and a target continuation (by default a PassKey prompt and its key), log p(target) is measured when the
FAM of one layer (or of every layer), as it stands after block k, is replaced, and the stream then goes
on to the question block as usual:

``ablate``      by the initial FAM (what the model knows without memory), in the clean run;
``patch``       by the FAM of the same prompt with another key (the corrupted run): what changes when
                only the key differs, i.e. the key's causal path;
``write-time``  the other way round: the clean FAM patched into the corrupted run after block k. Over
                blocks it shows when the key entered memory, over layers where it stays.

Δ log p is measured against the run intervened on (clean for ablate/patch, corrupted for write-time).
Ablating one layer keeps the stream's other layers as they are, so that layer's next FAM update keeps
the residual of the initial FAM put there (a stream restarted from the initial FAM drops it, docs/algorithm.md §3):
exactly "no memory" only in the row that ablates every layer, or at the last block, where no update follows
before the question.
At the last block (the FAM the question block reads) an intervention costs one question block: the
stream's states are computed once per trial and forked. At an earlier block k the blocks k+1 … T run
again from the patched state. For one layer, ``head_layer`` also replaces the FAM keys/values of one
key-value head group at a time, as the question block reads them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from famviz.core.decode import BlockCursor, fam_keys_values
from famviz.core.fam_model import FamModel, StreamState
from famviz.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from famviz.probes.passkey import PasskeyDocument

METHODS = ("ablate", "patch", "write-time")
ALL_LAYERS = "all"


@dataclass(frozen=True)
class Case:
    """A prompt, its target and where the question block starts (a whole number of blocks in)."""

    prompt: list[int]
    target: list[int]
    split: int  # tokens streamed as whole blocks before the question block

    def blocks(self, block_size: int) -> int:
        return self.split // block_size


def passkey_case(document: PasskeyDocument, block_size: int) -> Case:
    """A PassKey prompt split as ``famviz.probes.passkey.ask`` does: whole blocks of its haystack, then the rest."""
    split = (len(document.haystack_ids) // block_size) * block_size
    return Case(list(document.token_ids), list(document.answer_ids), split)


def text_case(tokenizer: PreTrainedTokenizerBase, text: str, target: str, block_size: int) -> Case:
    """Any text and target string: the question block holds at least the text's last token."""
    from famviz.core.tokenize import tokenize_document

    prompt, _ = tokenize_document(tokenizer, text)
    whole = tokenizer(text + target, add_special_tokens=False)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    target_ids = (
        whole[len(plain) :]
        if whole[: len(plain)] == plain
        else tokenizer(target, add_special_tokens=False)["input_ids"]
    )
    if not prompt or not target_ids:
        raise ConfigError("the text and the target must both be non-empty")
    return Case(list(prompt), list(target_ids), ((len(prompt) - 1) // block_size) * block_size)


# -- measuring -----------------------------------------------------------------------------------
@torch.inference_mode()
def block_states(fam_model: FamModel, case: Case) -> list[StreamState]:
    """states[k]: the stream's state after k whole blocks of the prompt (k = 0 … blocks)."""
    block = fam_model.config.block_size
    states = [fam_model.initial_state()]
    for start in range(0, case.split, block):
        ids = torch.tensor([case.prompt[start : start + block]])
        states.append(fam_model.forward_block(ids, states[-1]).state)
    return states


@torch.inference_mode()
def continue_to_question(fam_model: FamModel, state: StreamState, case: Case, from_block: int) -> StreamState:
    """Run the case's blocks after ``from_block`` (from ``state``) up to the question block."""
    block = fam_model.config.block_size
    for start in range(from_block * block, case.split, block):
        state = fam_model.forward_block(torch.tensor([case.prompt[start : start + block]]), state).state
    return state


@torch.inference_mode()
def target_logprob(
    fam_model: FamModel,
    state: StreamState,
    case: Case,
    target: Sequence[int] | None = None,
    fam_kv_edit: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """log p(target | prompt), the question block read from ``state`` (optionally with edited FAM keys/values)."""
    target = list(case.target if target is None else target)
    tail = case.prompt[case.split :]
    logits = BlockCursor(fam_model, state, fam_kv_edit).extend(tail + target)
    rows = torch.log_softmax(logits[len(tail) - 1 : len(tail) - 1 + len(target)], dim=-1)
    return float(rows.gather(1, torch.tensor(target).unsqueeze(1)).sum())


def with_layer_fam(state: StreamState, layer: int | str, fam: Sequence[torch.Tensor]) -> StreamState:
    """``state`` whose FAM of ``layer`` (or of every layer, ``"all"``) is taken from ``fam``."""
    if layer == ALL_LAYERS:
        return replace(state, fam=tuple(fam))
    return replace(state, fam=tuple(fam[i] if i == layer else f for i, f in enumerate(state.fam)))


# -- one trial ------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One trial's runs: the clean case, the corrupted one (patching) and their per-block states."""

    clean: Case
    clean_states: list[StreamState]
    corrupted: Case | None = None
    corrupted_states: list[StreamState] | None = None
    values: dict = field(default_factory=dict)  # "clean", "corrupted", "ablated" log-probs


def prepare_trial(fam_model: FamModel, clean: Case, corrupted: Case | None) -> Trial:
    if corrupted is not None and (len(corrupted.prompt) != len(clean.prompt) or corrupted.split != clean.split):
        raise ConfigError("the corrupted prompt must have the clean prompt's length in tokens")
    trial = Trial(clean, block_states(fam_model, clean))
    trial.values["clean"] = target_logprob(fam_model, trial.clean_states[-1], clean)
    initial = fam_model.initial_state()
    ablated = replace(trial.clean_states[-1], fam=initial.fam, fam_fresh=True)  # as if streamed from the initial FAM
    trial.values["ablated"] = target_logprob(fam_model, ablated, clean)
    if corrupted is not None:
        trial.corrupted, trial.corrupted_states = corrupted, block_states(fam_model, corrupted)
        trial.values["corrupted"] = target_logprob(fam_model, trial.corrupted_states[-1], corrupted, clean.target)
    return trial


def intervened_logprob(fam_model: FamModel, trial: Trial, method: str, layer: int | str, block: int) -> float:
    """log p(clean target) after replacing ``layer``'s FAM (or every layer's) as it stands after ``block``."""
    if method == "write-time":
        case, states, source = trial.corrupted, trial.corrupted_states, trial.clean_states[block].fam
    else:
        case, states = trial.clean, trial.clean_states
        source = fam_model.initial_state().fam if method == "ablate" else trial.corrupted_states[block].fam
    state = with_layer_fam(states[block], layer, source)
    if method == "ablate" and layer == ALL_LAYERS:
        state = replace(state, fam_fresh=True)  # exactly a stream restarted from the initial FAM
    state = continue_to_question(fam_model, state, case, block)
    return target_logprob(fam_model, state, case, trial.clean.target)


def head_group_logprob(fam_model: FamModel, trial: Trial, method: str, layer: int, group: int) -> float:
    """As ``intervened_logprob`` at the last block, for one key-value head group of ``layer`` only: the
    question block reads that group's FAM keys/values from the replacement. NaN when the question and target
    run past the question block's end: the next block reads a FAM the edit cannot reach."""
    if len(trial.clean.prompt) - trial.clean.split + len(trial.clean.target) > fam_model.config.block_size:
        return float("nan")
    if method == "write-time":
        case, state, other = trial.corrupted, trial.corrupted_states[-1], trial.clean_states[-1]
    else:
        case, state = trial.clean, trial.clean_states[-1]
        other = replace(state, fam=fam_model.initial_state().fam) if method == "ablate" else trial.corrupted_states[-1]
    other_k, other_v = fam_keys_values(fam_model, other, layer)

    def edit(index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if index != layer:
            return keys, values
        keys, values = keys.clone(), values.clone()
        keys[:, group], values[:, group] = other_k[:, group], other_v[:, group]
        return keys, values

    return target_logprob(fam_model, state, case, trial.clean.target, fam_kv_edit=edit)


# -- a whole experiment -----------------------------------------------------------------------------
@dataclass
class InterventionResult:
    """Mean Δ log p(target) per (layer, block), per head group, and the reference values, over trials."""

    method: str
    layers: list  # layer indices, then "all"
    blocks: list[int]  # the FAM after this many blocks was replaced
    delta: np.ndarray  # (len(layers), len(blocks)), NaN where not (yet) measured
    head_layer: int | None = None
    head_delta: np.ndarray | None = None  # (kv head groups,)
    values: dict = field(default_factory=dict)  # mean "clean", "ablated", "corrupted" log-probs
    trials: int = 0
    config: dict = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return "corrupted" if self.method == "write-time" else "clean"

    def to_dict(self) -> dict:
        def plain(a: np.ndarray | None) -> list[list[float | None]] | None:
            return None if a is None else [[None if np.isnan(v) else float(v) for v in row] for row in np.atleast_2d(a)]

        return {
            "method": self.method,
            "reference": self.reference,
            "layers": self.layers,
            "blocks": self.blocks,
            "delta_logprob": plain(self.delta),
            "head_layer": self.head_layer,
            "head_group_delta_logprob": plain(self.head_delta)[0] if self.head_delta is not None else None,
            "logprob": {k: float(v) for k, v in self.values.items()},
            "trials": self.trials,
            "config": self.config,
        }


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def run_interventions(
    fam_model: FamModel,
    cases: Sequence[tuple[Case, Case | None]],
    method: str,
    *,
    blocks: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    head_layer: int | None = None,
    on_update: Callable[[InterventionResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> InterventionResult:
    """Every intervention of ``method`` over (clean, corrupted) case pairs, averaged over them.

    ``blocks``: after which blocks the FAM is replaced (default: the last, the one the question block reads;
    write-time: every block from 1). ``layers``: default every layer; the row "all" replaces every layer at
    once. ``on_update(result)`` after each intervention; ``should_stop`` ends early with the cells measured.
    """
    result = None
    for result in iter_interventions(fam_model, cases, method, blocks=blocks, layers=layers, head_layer=head_layer):
        if on_update is not None:
            on_update(result)
        if should_stop is not None and should_stop():
            break
    return result


def iter_interventions(
    fam_model: FamModel,
    cases: Sequence[tuple[Case, Case | None]],
    method: str,
    *,
    blocks: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    head_layer: int | None = None,
) -> Iterator[InterventionResult]:
    """``run_interventions`` one intervention at a time: yields the (same, updated) result after each, the
    last block's cells first (they cost one question block each). Arguments are checked before the first."""
    check_method(method)
    if not fam_model.fam_len:
        raise ConfigError("FAM interventions need a model in fam mode (this one has no FAM)")
    if method != "ablate" and any(corrupted is None for _, corrupted in cases):
        raise ConfigError(f"--method {method} needs a corrupted prompt for every clean one")
    if not cases:
        raise ConfigError("no prompts to intervene on")
    n_blocks = min(clean.blocks(fam_model.config.block_size) for clean, _ in cases)
    if n_blocks < 1:
        raise ConfigError(
            "the prompt must span more than one block: its question block has to read a FAM written by earlier blocks"
        )
    if blocks is None:
        blocks = list(range(1, n_blocks + 1)) if method == "write-time" else [n_blocks]
    blocks = sorted(set(int(b) for b in blocks))
    if not blocks or blocks[0] < 1 or blocks[-1] > n_blocks:
        raise ConfigError(f"blocks must be from 1 to {n_blocks} (the prompt's whole blocks before the question)")
    n_layers = len(fam_model.layers)
    layer_list = list(range(n_layers)) if layers is None else sorted({int(layer) for layer in layers})
    if any(not 0 <= layer < n_layers for layer in layer_list):
        raise ConfigError(f"layers must be from 0 to {n_layers - 1}")
    if head_layer is not None and not 0 <= head_layer < n_layers:
        raise ConfigError(f"--head-layer must be from 0 to {n_layers - 1}")
    return _interventions(fam_model, cases, method, blocks, [*layer_list, ALL_LAYERS], head_layer)


def _interventions(
    fam_model: FamModel,
    cases: Sequence[tuple[Case, Case | None]],
    method: str,
    blocks: list[int],
    rows: list[int | str],
    head_layer: int | None,
) -> Iterator[InterventionResult]:
    sums, counts = np.zeros((len(rows), len(blocks))), np.zeros((len(rows), len(blocks)))
    groups = fam_model.n_kv_heads
    head_sums, head_counts = np.zeros(groups), np.zeros(groups)
    value_sums: dict[str, float] = {}
    result = InterventionResult(
        method,
        rows,
        blocks,
        np.full((len(rows), len(blocks)), np.nan),
        head_layer,
        np.full(groups, np.nan) if head_layer is not None else None,
    )

    def updated() -> InterventionResult:
        result.delta = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if head_layer is not None:
            result.head_delta = np.where(head_counts > 0, head_sums / np.maximum(head_counts, 1), np.nan)
        return result

    for clean, corrupted in cases:
        trial = prepare_trial(fam_model, clean, corrupted)
        reference = trial.values[result.reference]
        for key, value in trial.values.items():
            value_sums[key] = value_sums.get(key, 0.0) + value
        result.trials += 1
        result.values = {k: v / result.trials for k, v in value_sums.items()}
        for j in reversed(range(len(blocks))):  # the last block first: it costs one question block
            for i, layer in enumerate(rows):
                sums[i, j] += intervened_logprob(fam_model, trial, method, layer, blocks[j]) - reference
                counts[i, j] += 1
                yield updated()
        if head_layer is not None:
            for group in range(groups):
                value = head_group_logprob(fam_model, trial, method, head_layer, group)
                if np.isfinite(value):  # a trial whose answer crosses into the next block is not measurable
                    head_sums[group] += value - reference
                    head_counts[group] += 1
                yield updated()


# -- PassKey cases ----------------------------------------------------------------------------------
def passkey_cases(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    length: int,
    depth: float,
    trials: int,
    seed: int,
    text: str | None = None,
) -> list[tuple[Case, Case]]:
    """(clean, corrupted) PassKey prompts: the corrupted one hides another key with as many tokens."""
    from famviz.probes import passkey as pk

    pairs = []
    for document in pk.trial_documents(tokenizer, length, depth, trials, seed, text):
        rng = random.Random(f"corrupt:{seed}:{length}:{depth}:{document.key}")
        for _ in range(200):
            key = pk.random_key(rng)
            if key == document.key or len(str(key)) != len(str(document.key)):
                continue
            other = (
                pk.make_passkey_document(tokenizer, length, depth, key=key)
                if text is None
                else pk.make_document_probe(tokenizer, text, depth, length, key=key)
            )
            if other.length == document.length and len(other.haystack_ids) == len(document.haystack_ids):
                break
        else:
            raise ConfigError(f"found no second key whose prompt has the same {document.length} tokens")
        pairs.append((passkey_case(document, block_size), passkey_case(other, block_size)))
    return pairs

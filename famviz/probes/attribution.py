"""Attribution through the memory: which input tokens a prediction came from, across every FAM update.

Gradient × input: log p(target | tokens) is backpropagated through the whole stream (every block's FAM
update, no stop-gradient, as training does) to each token's input embedding e_i, and token i gets
g_i · e_i (summed over the embedding). A token in an earlier block can reach the target only through the
memory (the FAM, or memory blocks where the mode keeps them), so attribution on it is attribution through
the memory. Memory: the whole stream's graph is kept, about as much as one training step on that length.

    >>> result = attribute(fam_model, document.token_ids, document.answer_ids)
    >>> key_beats_every_span(result.scores, document.key_span, document.question_start)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from famviz.core.fam_model import FamModel


@dataclass(frozen=True)
class Attribution:
    """Gradient × input of one target's log-probability on every input token."""

    scores: np.ndarray  # (tokens,) float32, signed: g_i · e_i
    target_logprob: float  # log p(target | tokens), summed over the target's tokens


def attribute(fam_model: FamModel, token_ids: Sequence[int], target_ids: Sequence[int]) -> Attribution:
    """Stream ``token_ids`` then ``target_ids`` (teacher-forced) block by block from the initial state with
    gradients, and attribute log p(target) to each of ``token_ids`` (the target's own tokens are not scored)."""
    if not token_ids or not target_ids:
        raise ValueError("attribution needs input tokens and a target")
    ids = [*token_ids, *target_ids]
    block = fam_model.config.block_size
    leaves: list[torch.Tensor] = []

    def keep_as_leaf(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    handle = fam_model.decoder.embed_tokens.register_forward_hook(keep_as_leaf)
    try:
        with torch.enable_grad():
            # A copy of the initial FAM: the cached one may come from a stream under inference mode, whose
            # tensors cannot join a graph.
            fam = tuple(f.clone() for f in fam_model.initial_fam()) if fam_model.fam_len else None
            state, rows = fam_model.initial_state(fam=fam), []
            for start in range(0, len(ids), block):
                out = fam_model.forward_block(torch.tensor([ids[start : start + block]]), state)
                state = out.state
                rows.append(out.hidden[0])
            hidden = torch.cat(rows)  # (tokens, d): position i predicts token i + 1
            first = len(token_ids) - 1
            predicting = hidden[first : first + len(target_ids)]
            targets = torch.tensor(target_ids, device=predicting.device)
            logprob = -fam_model.target_nll(predicting, targets).sum()
            grads = torch.autograd.grad(logprob, leaves)
    finally:
        handle.remove()
    scores = torch.cat([(g * e).sum(-1)[0] for g, e in zip(grads, leaves, strict=True)]).float()
    return Attribution(scores=scores[: len(token_ids)].detach().cpu().numpy(), target_logprob=float(logprob))


def span_totals(scores: np.ndarray, length: int, stop: int | None = None) -> np.ndarray:
    """Σ |score| over every window of ``length`` tokens starting at 0 … (stop or len) − length."""
    magnitude = np.abs(np.asarray(scores, dtype=np.float64)[: stop or len(scores)])
    if length > len(magnitude):
        return np.zeros(0)
    sums = np.concatenate([[0.0], np.cumsum(magnitude)])
    return sums[length:] - sums[:-length]


def key_over_best_other(scores: np.ndarray, key_span: tuple[int, int], stop: int) -> float:
    """The key sentence's total |attribution| ÷ the largest of every other span of as many tokens that does
    not overlap it, among the tokens before ``stop`` (the question's start); inf when there is no other."""
    start, end = key_span
    totals = span_totals(scores, end - start, stop)
    best_other = max((t for i, t in enumerate(totals) if i + (end - start) <= start or i >= end), default=0.0)
    return float(totals[start] / best_other) if best_other > 0 else float("inf")


def key_beats_every_span(scores: np.ndarray, key_span: tuple[int, int], stop: int) -> bool:
    """Whether the key sentence's tokens carry more |attribution| than every other span of as many tokens
    that does not overlap it, among the tokens before ``stop`` (the question's start)."""
    return key_over_best_other(scores, key_span, stop) > 1.0

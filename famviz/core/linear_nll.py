"""Next-token NLL through a frozen output projection, with its gradient formed in the forward pass.

Training scores a few hundred rows per block against a 49k-token vocabulary. The plain form
(``cross_entropy(lm_head(h).float(), t)``) keeps a float32 (rows, vocab) tensor for backward and, on a
CPU, spends far more time on it (the float32 copy, a zero-filled gradient, log-softmax's backward, the
cast back) than on the two matrix multiplies themselves: measured on the bundled model, about a sixth of
a training step. Here the weight is frozen, so the gradient with respect to the rows is

    d nll_r / d h_r = (softmax(h_r W^T) - onehot(t_r)) W

and ``grad_output`` only scales each row. It is computed right away: one low-precision logits GEMM, the
float32 softmax a few rows at a time (those stay in cache) written back over the logits in place, and
one GEMM to the model width. Backward is a row-wise scale of the saved (rows, d) result; no (rows, vocab)
tensor outlives the forward pass.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

ROWS_PER_SOFTMAX = 32  # rows per float32 log-softmax: small enough to stay in cache


class _LinearNll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()  # (rows, vocab), the compute dtype
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0]
        for start in range(0, hidden.shape[0], ROWS_PER_SOFTMAX):
            rows = slice(start, start + ROWS_PER_SOFTMAX)
            logp = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)
            picked = targets[rows].unsqueeze(1)
            nll[rows] = -logp.gather(1, picked).squeeze(1)
            if needs_grad:
                probs = logp.exp_()
                probs.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=probs.dtype))
                logits[rows] = probs  # the softmax minus the one-hot, over the logits it came from
        ctx.save_for_backward(logits @ weight if needs_grad else None)
        return nll

    @staticmethod
    def backward(ctx: FunctionCtx, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (row_grads,) = ctx.saved_tensors
        if row_grads is None:
            return None, None, None
        return (grad_nll.unsqueeze(1) * row_grads.float()).to(row_grads.dtype), None, None


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row NLL (rows,) float32 of ``targets`` (rows,) under softmax(hidden @ weight^T).

    hidden: (rows, d), differentiable; weight: (vocab, d), frozen (no gradient flows to it).
    Equal to ``cross_entropy((hidden @ weight.T).float(), targets, reduction="none")``.
    """
    if weight.requires_grad:
        raise ValueError("linear_nll computes no weight gradient: the output projection must be frozen")
    return _LinearNll.apply(hidden, weight, targets)

"""Linear projections that read the same input, computed as one matrix multiply (training's fast path).

A decoder layer applies q/k/v to one normalised input and gate/up to another; o and down are groups
of one. On a CPU, three or
two small matrix multiplies, each with its own LoRA pair (peft: two tiny multiplies, a scale and an
add per projection), cost far more than their FLOPs: measured on the bundled model, peft's LoRA
alone added 42% to a training step. ``ProjectionGroup`` computes a group as

    y = x @ [W_1; W_2; ...]^T + b  +  (x @ [A_1; A_2; ...]^T) @ blockdiag(s_1 B_1, s_2 B_2, ...)^T

whose i-th column block is exactly x W_i^T + b_i + s_i (x A_i^T) B_i^T, the plain LoRA projection. The
concatenated frozen weights are built once (and rebuilt if a weight changes, e.g. an adapter merge); the LoRA
weights are used as they are, cast to the compute dtype inside the graph, so float32 master weights receive
the gradients of a bfloat16 step (mixed precision).

Groups whose modules are anything but plain ``nn.Linear`` or vanilla peft LoRA (dropout in training,
DoRA or other variants, several active adapters) are computed module by module instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearParts:
    """A projection as frozen base weight and bias plus its LoRA terms [(A (r, in), B (out, r), scale)]."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]


def linear_parts(module: torch.nn.Module) -> LinearParts | None:
    """The parts of a plain ``nn.Linear`` or a vanilla peft LoRA linear; None for anything else."""
    if type(module) is torch.nn.Linear:
        return LinearParts(module.weight, module.bias, ())
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        return None
    if module.disable_adapters or module.merged:
        return LinearParts(base.weight, base.bias, ())
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}):
            return None  # DoRA and other variants have their own forward
        dropout = module.lora_dropout[name]
        if module.training and not isinstance(dropout, torch.nn.Identity):
            return None
        terms.append((module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])))
    return LinearParts(base.weight, base.bias, tuple(terms))


class ProjectionGroup:
    """Projections of one input (e.g. a layer's q, k, v) applied as one; ``__call__`` returns their outputs."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self._frozen_key: tuple | None = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (..., in) → one tensor (..., out_i) per module, equal to ``module(x)``."""
        parts = [linear_parts(m) for m in self.modules]
        if (
            any(p is None for p in parts)
            or len({len(p.lora) for p in parts}) > 1
            or any(len(p.lora) > 1 for p in parts)
            or any(p.weight.requires_grad for p in parts)
        ):
            return [m(x) for m in self.modules]  # not the plain case: module by module
        weight, bias = self._frozen(parts)
        flat = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        if parts[0].lora:
            a, b = self._lora(parts, x.dtype)
            # The LoRA term accumulated into y by the GEMM itself, in place (y's producer does not keep it).
            y = y.addmm_(flat @ a.t(), b.t())
        y = y.view(*x.shape[:-1], y.shape[-1])
        if len(parts) == 1:
            return [y]
        return list(y.split([p.weight.shape[0] for p in parts], dim=-1))

    @staticmethod
    def _lora(parts: list[LinearParts], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's LoRA factors in the compute dtype: [A_1; A_2; ...] and blockdiag(s_i B_i)."""
        if len(parts) == 1:
            a, b, scale = parts[0].lora[0]
            return a.to(dtype), (b * scale).to(dtype)
        a = torch.cat([p.lora[0][0].to(dtype) for p in parts])
        b = torch.block_diag(*[(p.lora[0][1] * p.lora[0][2]).to(dtype) for p in parts])
        return a, b

    def _frozen(self, parts: list[LinearParts]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated base weights and biases, rebuilt when any of them changed."""
        if len(parts) == 1:  # nothing to concatenate: the module's own tensors
            return parts[0].weight, parts[0].bias
        tensors = [p.weight for p in parts] + [p.bias for p in parts if p.bias is not None]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if key != self._frozen_key:
            with torch.no_grad():
                self._weight = torch.cat([p.weight for p in parts])
                self._bias = None
                if any(p.bias is not None for p in parts):
                    self._bias = torch.cat(
                        [p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in parts]
                    )
            self._frozen_key = key
        return self._weight, self._bias

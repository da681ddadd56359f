"""Random Position Offset and Random State Passing (docs/algorithm.md §4, §5), and the state a training
sequence starts from.

* RPO: each sequence's RoPE positions are shifted by an offset drawn from U[0, 2π·rope_theta), zeroed with
  probability 0.5. The engine rebases positions to each window's start, so the offset is added to the
  rebased positions RoPE receives (``TrainingFamModel``).
* RSP: the final FAM of batch element 0 (every layer, detached) is kept; the next step starts from it with
  probability p (0.8), else from the learned prompt's initial FAM.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch

from famviz.core.fam_model import FamModel, StreamState, WindowAngles

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class TrainingFamModel(FamModel):
    """FamModel with a per-example RoPE position offset (RPO) added to the positions RoPE receives.

    The engine rebases each window's positions to its start; RPO shifts those rebased positions of
    every query and key of a sequence by the same offset, so attention scores are equal in exact
    arithmetic but the model sees the rotations (and rounding) of large positions.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position_offsets: torch.Tensor | None = None  # (batch,) float, or None

    def window_angles(self, position: int, m: int, f: int, n: int) -> WindowAngles:
        if self.position_offsets is None:
            return super().window_angles(position, m, f, n)
        rows, memory = self.window_positions(position, m, f, n)  # the engine's positions; only the angles differ
        return WindowAngles(
            *self._offset_rope(rows), *(self._offset_rope(memory) if memory is not None else (None, None))
        )

    def _offset_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = self.position_offsets.to(device=self.device, dtype=torch.float64)
        shifted = positions.to(device=self.device, dtype=torch.float64).unsqueeze(0) + offsets.unsqueeze(1)
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.decoder.rotary_emb(probe, shifted.float())  # (batch, P, head_dim), fp32 angles
        return cos.unsqueeze(1), sin.unsqueeze(1)


def rope_theta(config: PretrainedConfig) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", 10000.0))


def draw_position_offsets(rng: random.Random, batch: int, theta: float) -> torch.Tensor:
    """RPO offsets per example: U[0, 2π·theta), zeroed with probability 0.5 (docs/algorithm.md §4)."""
    return torch.tensor(
        [0.0 if rng.random() < 0.5 else rng.uniform(0.0, 2 * math.pi * theta) for _ in range(batch)],
        dtype=torch.float64,
    )


class StatePassing:
    """Random State Passing (docs/algorithm.md §5): reuse batch element 0's final FAM with probability p."""

    def __init__(self, prob: float):
        self.prob = prob
        self.saved: tuple[torch.Tensor, ...] | None = None

    def choose(self, rng: random.Random) -> tuple[torch.Tensor, ...] | None:
        """The FAM to start from (None = the learned initial FAM). Always draws, so RNG use is fixed."""
        use = rng.random() < self.prob
        return self.saved if use and self.saved is not None else None

    def remember(self, final_fam: tuple[torch.Tensor, ...]) -> None:
        self.saved = tuple(f[:1].detach().clone() for f in final_fam)


def initial_training_state(
    fam_model: FamModel, batch: int, prompt: torch.Tensor | None, passed: tuple[torch.Tensor, ...] | None
) -> StreamState:
    """The state a training sequence starts from: the FAM prompt run up the stack (differentiable,
    recomputed every step since the prompt changes) or a FAM passed on from the previous step."""
    if not fam_model.fam_len:
        return fam_model.initial_state(batch)
    if passed is not None:
        return fam_model.initial_state(batch, fam=passed, fam_fresh=False)
    return fam_model.initial_state(batch, fam=fam_model.run_prompt_up_the_stack(prompt))

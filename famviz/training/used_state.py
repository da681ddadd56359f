"""Used memories for PassKey steps: the FAM a key is written into has already read real text.

A trained memory writes a key it can read back only into the fresh initial FAM (docs/training-history.md
§16): after a document's first blocks the FAM is a used state, and there the write fails. Random State
Passing teaches writing into a used state at the cost of a training step's backward pass through it and
without control over what the state has read. Here the used state comes from a forward pass without
gradient over ``n`` blocks of real text from the learned initial FAM (inference runs ~2.5× training's
speed), ``n`` drawn from a range, so a chosen share of PassKey steps starts from a memory of 1–32 updates.

What the used memory has read is real text, the PassKey filler (what the grid's keys at depth > 0 are
written after), or either at even odds: a stage that learnt to write after real text only lost the keys
written after filler (docs/training-history.md §18).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from famviz.training.config import USED_TEXTS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from famviz.core.fam_model import FamModel
    from famviz.training.data import TextCorpus


def read_text_into_fam(
    fam_model: FamModel, prompt: torch.Tensor, ids: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, ...]:
    """The FAM (per layer (1, fam_len, d), detached) after streaming ``ids`` (1, n) block by block from
    the initial FAM of ``prompt``: what the engine's stream of the same tokens hands on, without gradient
    and without touching the model's parameters or their gradients."""
    with torch.no_grad():
        state = fam_model.initial_state(1, fam=fam_model.run_prompt_up_the_stack(prompt.detach()))
        for start in range(0, ids.shape[1], block_size):
            state = fam_model.forward_block(ids[:, start : start + block_size], state).state
    return tuple(f.detach() for f in state.fam)


class PasskeyFiller:
    """Windows of the PassKey prompts' filler, tokenized once, each starting at a random token of its cycle."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        from famviz.probes.passkey import FILLER

        self.tokenizer = tokenizer
        self.cycle = len(tokenizer(FILLER + " ", add_special_tokens=False)["input_ids"])  # tokens a sentence round
        self.ids: list[int] = []

    def window(self, rng: random.Random, length: int) -> list[int]:
        if len(self.ids) < length + self.cycle:  # one tokenization of the longest window asked for
            from famviz.probes.passkey import repeated_filler

            text = repeated_filler(6 * (length + self.cycle) + 200)
            self.ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        start = rng.randrange(self.cycle)
        return self.ids[start : start + length]


class UsedStates:
    """With probability ``prob`` a PassKey step starts from a FAM that has read ``blocks`` (low, high) blocks
    of real text from ``corpus`` or of ``filler`` (``reads``: one of USED_TEXTS); draws from the step's
    generator only when ``prob`` > 0, so a run without used states keeps its random sequence."""

    def __init__(
        self,
        prob: float,
        blocks: tuple[int, int],
        corpus: TextCorpus | None,
        block_size: int,
        reads: str = "text",
        filler: PasskeyFiller | None = None,
    ):
        if reads not in USED_TEXTS:
            raise ValueError(f"a used memory reads one of {', '.join(USED_TEXTS)}, not {reads!r}")
        if prob > 0 and reads != "filler" and corpus is None:
            raise ValueError("used states need a text corpus")
        if prob > 0 and reads != "text" and filler is None:
            raise ValueError("used states of filler need the PassKey filler")
        self.prob = prob
        self.blocks = blocks
        self.corpus = corpus
        self.block_size = block_size
        self.reads = reads
        self.filler = filler

    def choose(self, rng: random.Random, passkey_step: bool) -> int:
        """Blocks of text the step's FAM reads first (0: none)."""
        if self.prob <= 0:
            return 0
        use = rng.random() < self.prob
        blocks = rng.randint(*self.blocks)
        return blocks if use and passkey_step else 0

    def make(
        self, fam_model: FamModel, prompt: torch.Tensor, blocks: int, rng: random.Random
    ) -> tuple[tuple[torch.Tensor, ...], str]:
        """The used FAM and what it read ("text" or "filler")."""
        reads = self.reads if self.reads != "mix" else ("filler" if rng.random() < 0.5 else "text")
        source = self.filler if reads == "filler" else self.corpus
        ids = source.window(rng, blocks * self.block_size)
        fam = read_text_into_fam(fam_model, prompt, torch.tensor([ids], device=fam_model.device), self.block_size)
        return fam, reads

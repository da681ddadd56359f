"""What `famviz evaluate` runs: its sizes (the full check's, --quick's) and the checked plan. Light (no
torch), so that the command line parses and answers ``--help`` without loading the library; the evaluation
itself is ``famviz.training.evaluation``, its options ``famviz.commands.evaluate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from famviz.core.config import FamConfig  # light: no torch

if TYPE_CHECKING:
    from famviz.io.adapters import Adapter
    from famviz.probes.passkey import ModeSpec

MIN_LONG_TOKENS = 1024
CORPUS_DOCUMENTS = 2  # held-out documents of a corpus used for the long-document check


@dataclass(frozen=True)
class Sizes:
    """How much `famviz evaluate` runs. ``lengths`` None: the shortest PassKey prompt whose key only the FAM
    can carry, (memory blocks + 2) blocks; ``long_documents`` None: every default long document."""

    modes: str
    lengths: str | None
    depths: str
    trials: int
    long_tokens: int
    norm_after_blocks: str
    windows: int  # in-window loss: windows of one block each
    long_documents: int | None


FULL = Sizes("fam,bswa,full", "2048,4096,8192", "0", 50, 8192, "4,64", 8, None)
# A smoke check in about 1.5 minutes on a 2-core CPU with the bundled model (87 s, AVX2 EPYC, float32): a few
# keys at one short length, one short held-out document, the FAM norm within it. Its figures are noisy: look
# at them, do not report them.
QUICK = Sizes("fam,bswa", None, "0", 5, MIN_LONG_TOKENS, "4", 4, 1)
SIZED_OPTIONS = ("modes", "lengths", "depths", "trials", "long_tokens", "norm_after_blocks")
MIN_PASSKEY_LENGTH = 64
NORM_AFTER_BLOCKS = (4, 64)  # the FAM norm is read after a few and after many blocks


@dataclass
class EvaluationPlan:
    """What `famviz evaluate` will run, checked before anything is loaded."""

    adapter: Adapter | None  # None: the untuned conversion
    config: FamConfig
    lengths: list[int]
    depths: list[float]
    specs: list[ModeSpec]  # empty: no PassKey grid
    model: str | None = None  # a Hugging Face id or path; None: the bundled model
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0  # of the PassKey keys
    documents: list[str] | None = None  # long documents given by path (None: GPL-3 and pydoc)
    corpus: list[str] | None = None  # long documents from this corpus's held-out split
    figure: str | None = None  # where the PassKey grid's heatmap goes (checked)
    sizes: Sizes = FULL
    norm_after: tuple[int, ...] = NORM_AFTER_BLOCKS
    quick: bool = False
    write_card: bool = False  # record the results in the adapter's training card

    @property
    def parts(self) -> list[str]:
        """The parts run, in order (each gets its own progress bar)."""
        return (
            ["loading", "in-window loss"]
            + (["long documents"] if self.sizes.long_tokens else [])
            + (["PassKey"] if self.specs else [])
        )

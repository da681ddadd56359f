"""The attention modes, as one table that the engine, the command line, the app, ``evaluate`` and the figures read.

A block's window is [sink tokens | memory blocks | FAM | block] (docs/algorithm.md §2); a mode says which of
those regions it carries from block to block. The engine (``core.fam_model``) reads the flags below through
``FamConfig`` (``active_fam_len``, ``active_sink_tokens``, ``bounded``), and the mask rule for the regions
lives in ``core.attention``. A mode that combines existing regions is one new row here; a mode with a new
region or mask also touches those two files (docs/architecture.md, "Adding an attention mode").
"""

from __future__ import annotations

from dataclasses import dataclass

# The key groups attention shares are measured over: what block queries and what FAM queries attend to.
# "sink" comes last so that traces written before sink mode existed keep their group indices.
BLOCK_GROUPS = ("fam", "memory", "block", "sink")
FAM_GROUPS = ("fam", "block")


@dataclass(frozen=True)
class Mode:
    """One attention mode: what a block attends to besides its own tokens, and which settings it reads."""

    name: str  # as the command line, the app, configs and traces spell it
    label: str  # as the app's choices and evaluate's rows name it
    summary: str  # what a block attends to, in a few words (the app's mode radio)
    fam: bool = False  # fam_len FAM rows per layer, read and rewritten every block
    bounded: bool = True  # the memory holds at most mem_blocks blocks; False: every earlier token (own cache)
    sinks: bool = False  # the stream's first sink_tokens tokens are kept for ever before the memory blocks
    trainable: bool = False  # `famviz train` can tune it
    baseline: bool = False  # `famviz evaluate` streams each long document with the untuned model in it

    @property
    def options(self) -> tuple[str, ...]:
        """The FamConfig settings this mode reads (the others are ignored, and left out of its records)."""
        return (
            ("block_size",)
            + (("mem_blocks",) if self.bounded else ())
            + (("fam_len", "fam_norm") if self.fam else ())
            + (("sink_tokens",) if self.sinks else ())
        )

    @property
    def groups(self) -> tuple[str, ...]:
        """The BLOCK_GROUPS a block query of this mode can attend to (memory only when the run keeps some)."""
        present = {"fam": self.fam, "memory": True, "block": True, "sink": self.sinks}
        return tuple(group for group in BLOCK_GROUPS if present[group])

    def tag(self, mem_blocks: int) -> str:
        """The mode with its memory blocks, for file names and CLI specs: ``fam0``, ``bswa1``, ``full``."""
        return f"{self.name}{mem_blocks}" if self.bounded else self.name

    def describe(self, mem_blocks: int) -> str:
        """The mode with its memory blocks, for tables and legends: ``fam (mem 0)``, ``full``."""
        return f"{self.name} (mem {mem_blocks})" if self.bounded else self.name


MODE_TABLE: dict[str, Mode] = {
    row.name: row
    for row in (
        Mode("fam", "FAM", "window + feedback memory", fam=True, trainable=True),
        Mode("bswa", "BSWA", "window only", trainable=True, baseline=True),
        Mode(
            "sink",
            "attention sinks (StreamingLLM)",
            "window + the first tokens (StreamingLLM)",
            sinks=True,
            baseline=True,
        ),
        Mode("full", "full attention", "all tokens", bounded=False, baseline=True),
    )
}


def mode_summary() -> str:
    """Every mode with what its blocks attend to, on one line (the app's mode radios)."""
    return " · ".join(f"{name}: {row.summary}" for name, row in MODE_TABLE.items())


def mode_names(where: str = "") -> tuple[str, ...]:
    """The modes' names in table order; ``where`` names a flag (``trainable``, ``baseline``, ``fam``, ...) to keep
    only the modes that have it."""
    return tuple(name for name, row in MODE_TABLE.items() if not where or getattr(row, where))

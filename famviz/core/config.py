"""Settings of the FAM engine: attention mode and block geometry.

Defaults are the paper's (arXiv 2404.09173): block 1024, FAM 64 slots, 3 memory blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from famviz.core.modes import MODE_TABLE, Mode, mode_names
from famviz.errors import ConfigError

MODES = mode_names()  # "fam", "bswa", "sink", "full": the rows of core.modes.MODE_TABLE
FAM_NORMS = ("grow", "keep")  # how a FAM slot's norm evolves over updates (FamConfig.fam_norm)


@dataclass(frozen=True)
class FamConfig:
    """How a document is streamed.

    mode: a row of ``core.modes.MODE_TABLE``: ``fam`` (BSWA plus Feedback Attention Memory), ``bswa`` (block
    sliding window attention), ``sink`` (BSWA plus the keys/values of the stream's first ``sink_tokens``
    tokens kept for ever: StreamingLLM's attention sinks, the training-free streaming baseline) or ``full``
    (the model's own causal attention, unbounded cache).
    block_size: tokens per block. fam_len: FAM slots per layer (used by ``fam`` only).
    mem_blocks: cached past blocks of token keys/values per layer (``bswa``, ``fam`` and ``sink``).
    sink_tokens: kept first tokens (used by ``sink`` only; StreamingLLM's default is 4).
    fam_norm: ``grow`` (the paper's: each update adds to the FAM's residual stream, so its norm grows with
    the block count) or ``keep`` (after every update but the first, each FAM slot is rescaled to the norm it
    had before the update, so a new block's write stays the same share of the state; docs/algorithm.md §9).
    """

    mode: str = "fam"
    block_size: int = 1024
    fam_len: int = 64
    mem_blocks: int = 3
    sink_tokens: int = 4
    fam_norm: str = "grow"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("block_size", "fam_len", "mem_blocks", "sink_tokens"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.fam_norm not in FAM_NORMS:
            raise ConfigError(f"FAM norm must be one of {', '.join(FAM_NORMS)}, got {self.fam_norm!r}")
        if self.block_size <= 0:
            raise ConfigError(f"block size must be a positive number of tokens, got {self.block_size}")
        if self.fam_len < 0:
            raise ConfigError(f"FAM length must be 0 or more slots, got {self.fam_len}")
        if self.mem_blocks < 0:
            raise ConfigError(f"memory blocks must be 0 or more, got {self.mem_blocks}")
        if self.sink_tokens < 0:
            raise ConfigError(f"sink tokens must be 0 or more, got {self.sink_tokens}")

    @property
    def spec(self) -> Mode:
        """This config's row of the mode table: what its blocks attend to and which settings it reads."""
        return MODE_TABLE[self.mode]

    @property
    def active_fam_len(self) -> int:
        """FAM slots actually used: only a mode with a FAM has any."""
        return self.fam_len if self.spec.fam else 0

    @property
    def active_sink_tokens(self) -> int:
        """First tokens kept for ever: only a mode with sinks keeps any."""
        return self.sink_tokens if self.spec.sinks else 0

    @property
    def bounded(self) -> bool:
        """Whether the carried state has constant size (every mode but ``full``)."""
        return self.spec.bounded

    def in_mode(self, mode: str, **changes: object) -> FamConfig:
        """This geometry in another mode (with ``changes``), and no FAM slots where that mode has no FAM."""
        moved = replace(self, mode=mode, **changes)
        return replace(moved, fam_len=moved.active_fam_len)

    @property
    def has_memory(self) -> bool:
        """Whether a block's queries can see earlier blocks' tokens (memory blocks, or full attention's cache)."""
        return not self.bounded or self.mem_blocks > 0

    def geometry(self) -> list[str]:
        """The settings this mode reads, as words for status lines: ``block 256``, ``memory blocks 1``, ``FAM 64``."""
        words = {"block_size": "block", "mem_blocks": "memory blocks", "fam_len": "FAM", "sink_tokens": "sink tokens"}
        return [f"{words[name]} {getattr(self, name)}" for name in self.spec.options if name in words]

    def to_dict(self) -> dict:
        """The settings; ``sink_tokens`` and a non-default ``fam_norm`` only where the mode reads them, so records
        of the other modes read as they always have."""
        settings = asdict(self)
        if "sink_tokens" not in self.spec.options:
            settings.pop("sink_tokens")
        if "fam_norm" not in self.spec.options or self.fam_norm == "grow":
            settings.pop("fam_norm")
        return settings


# One table of defaults and limits for every front end (the app's tabs and the CLI). The FAM length is the
# paper's; block 256 and one memory block instead of its 1024 and 3 fit the bundled 135M model on a laptop
# CPU (a 2k-token prompt then spans 8 FAM updates) and are the shipped adapter's geometry.
TOOL_DEFAULTS = FamConfig(mode="fam", block_size=256, fam_len=64, mem_blocks=1)
LIMITS = {
    "block_size": (1, 8192),
    "fam_len": (1, 1024),
    "mem_blocks": (0, 64),
    "sink_tokens": (0, 8192),
    "max_tokens": (1, 1_000_000),
}
LABELS = {
    "block_size": "block size",
    "fam_len": "FAM length",
    "mem_blocks": "memory blocks",
    "sink_tokens": "sink tokens",
    "max_tokens": "max tokens",
    "fam_norm": "FAM norm",
}


def check_limits(config: FamConfig) -> FamConfig:
    """``config`` if its numbers lie within ``LIMITS`` (the FAM length only matters in fam mode), else a
    ConfigError naming the first one that does not."""
    for name in ("block_size", "fam_len", "mem_blocks", "sink_tokens"):
        if name in config.spec.options or name == "mem_blocks":
            check_limit(name, getattr(config, name))
    return config


def check_limit(name: str, value: int) -> int:
    low, high = LIMITS[name]
    if not low <= value <= high:
        raise ConfigError(f"{LABELS[name]} must be from {low} to {high:,}, got {value:,}")
    return value


def geometry_warnings(config: FamConfig) -> list[str]:
    """Settings that run but are unlikely to be what was meant (shown beside the results, never refused)."""
    warnings = []
    if config.active_fam_len and config.block_size < config.fam_len:
        warnings.append(
            f"the block ({config.block_size} tokens) is shorter than the FAM ({config.fam_len} slots): "
            f"each update compresses fewer tokens than the memory holds, and streaming is slow"
        )
    return warnings


def trained_geometry_differences(trained: FamConfig, config: FamConfig, adapter: str) -> list[str]:
    """One line per geometry setting in which a run differs from what its adapter was trained with (the
    mode may differ: comparing a tuned model's fam run with bswa or full is routine)."""
    names = ["block_size", "mem_blocks"] + (["fam_len", "fam_norm"] if config.spec.fam else [])
    return [
        f"adapter {adapter} was trained with {LABELS.get(name, name)} {getattr(trained, name)}, "
        f"this run uses {getattr(config, name)}"
        for name in names
        if getattr(trained, name) != getattr(config, name)
    ]


def number_list(text: object, kind: type[int] | type[float], name: str) -> list:
    """``"1000,2000"`` -> [1000, 2000] (``kind`` int or float), or a ConfigError naming the option."""
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{name} is empty")
    return values

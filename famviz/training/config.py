"""A training run's settings (``TrainConfig``); ``famviz.commands.train`` fills them from its options.

The config is saved with the run (``train_config.json``), so ``--resume`` continues with the same settings
and options given again override them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from famviz.core.config import FamConfig
from famviz.core.modes import mode_names
from famviz.errors import ConfigError
from famviz.training.data import parse_mixture, parse_range

USED_TEXTS = ("text", "filler", "mix")  # what a used memory has read: real text, PassKey filler, either

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_DIR = "checkpoint"
TRAIN_CONFIG = "train_config.json"
LOG_FILE = "train_log.jsonl"
BEST_DIR = "best"  # --keep-best: the adapter of the best held-out evaluation
LR_DECAYS = ("none", "linear", "cosine")


@dataclass
class TrainConfig:
    out: str
    model: str | None = None  # None = the bundled model
    mode: str = "fam"
    block_size: int = 256
    fam_len: int = 64
    mem_blocks: int = 0
    fam_norm: str = "grow"  # FamConfig.fam_norm: keep rescales each FAM slot to its norm before the update
    steps: int = 1000
    lr: float = 5e-4
    prompt_lr: float | None = None  # default: lr
    warmup_steps: int = 20
    lr_decay: str = "none"  # none, linear or cosine: from the end of warm-up down to lr × lr_final at --steps
    lr_final: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 1
    lora_rank: int = 16
    lora_alpha: float | None = None  # default: 2 × rank
    data: str = "passkey:0.8,copy:0.2"
    passkey_tokens: str = "256-2048"
    passkey_depth_zero: float = 0.5
    passkey_aligned: float = 0.0  # share of PassKey prompts whose answer starts in (or crosses into) a new block
    corpus: list[str] | None = None  # training text paths (famviz.io.corpus); None: the machine's text files
    copy_text_tokens: str = "768-1536"
    copy_len: int = 256
    copy_weight: float = 0.1
    text_weight: float = 0.0
    readout_weight: float = 0.0  # PassKey read-out probe after every block (weight of its answer; 0 = off)
    readout_split: float = 0.0  # share of steps whose probes cross a block boundary after the question
    readout_fill: float = 0.0  # share of split steps whose question ends a full block of the stream's text
    fam_growth_weight: float = 0.0  # loss weight of the FAM norm's growth per update (loss.FamGrowth)
    curriculum: str | None = None  # e.g. "2,4,8,16": PassKey prompts of up to n blocks, n raised when held-out
    curriculum_threshold: float = 0.9  # ... accuracy at n blocks reaches this
    init_from: str | None = None  # start from an adapter directory's LoRA and prompt (fresh optimizer)
    rpo: bool = True
    rsp: bool = True
    rsp_prob: float = 0.8
    used_state_prob: float = 0.0  # share of PassKey steps whose FAM first reads real text (training.used_state)
    used_state_blocks: str = "1-16"  # ... this many blocks of it, drawn from the range
    used_state_reads: str = "text"  # ... of real text, the PassKey filler, or either ("mix"): USED_TEXTS
    eval_every: int = 100
    eval_trials: int = 8
    eval_tokens: int = 1024
    eval_depth: float = 0.0  # where the held-out prompts' key sits (0 = the start; 0.5: written into a used memory)
    keep_best: bool = False  # the adapter of the best held-out evaluation so far, in best/
    checkpoint_every: int = 50
    max_minutes: float | None = None  # stop (checkpoint + adapter) after this wall time
    seed: int = 0
    checkpoint_layers: bool = True  # recompute each layer in backward (bounded memory; ~30% slower)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    device: str = "auto"
    dtype: str = "float32"
    adapter_dtype: str | None = (
        None  # LoRA weights in the written adapter (None: as trained); checkpoints keep full precision
    )
    command: str = ""  # every invocation of the run, resumes included
    stage_command: str = ""  # this invocation alone (a stage of the training card)

    @property
    def used_state_sources(self) -> frozenset[str]:
        """What the used memories read ("text", "filler"); empty without used memories."""
        if self.used_state_prob <= 0:
            return frozenset()
        return frozenset(("text", "filler")) if self.used_state_reads == "mix" else frozenset({self.used_state_reads})

    def fam_config(self) -> FamConfig:
        return FamConfig(
            mode=self.mode,
            block_size=self.block_size,
            fam_len=self.fam_len,
            mem_blocks=self.mem_blocks,
            fam_norm=self.fam_norm,
        )

    def lr_scale(self, step: int) -> float:
        """Multiplier of the base learning rates at optimiser step ``step`` (0-based): linear warm-up to 1,
        then 1 (``lr_decay`` none) or a linear / cosine decay reaching ``lr_final`` at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_decay == "none" or self.steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step + 1 - self.warmup_steps) / (self.steps - self.warmup_steps))
        shape = 1.0 - progress if self.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr_final + (1.0 - self.lr_final) * shape

    def validate(self) -> None:
        if self.mode not in mode_names("trainable"):
            raise ConfigError(f"training mode must be {' or '.join(mode_names('trainable'))}, got {self.mode!r}")
        if self.adapter_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"--adapter-dtype must be float32, float16 or bfloat16, got {self.adapter_dtype!r}")
        self.fam_config()
        for name in ("steps", "batch_size", "lora_rank", "copy_len", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.rsp_prob <= 1:
            raise ConfigError(f"--rsp-prob must be within 0…1, got {self.rsp_prob}")
        if not 0 <= self.eval_depth <= 1:
            raise ConfigError(f"--eval-depth must be within 0…1, got {self.eval_depth}")
        if not 0 <= self.used_state_prob <= 1:
            raise ConfigError(f"--used-state-prob must be within 0…1, got {self.used_state_prob}")
        if self.used_state_prob > 0 and not self.fam_config().active_fam_len:
            raise ConfigError("--used-state-prob needs a FAM to write into: train in fam mode with --fam-len > 0")
        parse_range(self.used_state_blocks, "--used-state-blocks")
        if self.used_state_reads not in USED_TEXTS:
            choices = ", ".join(USED_TEXTS)
            raise ConfigError(f"--used-state-reads must be one of {choices}, got {self.used_state_reads!r}")
        if not 0 <= self.passkey_aligned <= 1:
            raise ConfigError(f"--passkey-aligned must be within 0…1, got {self.passkey_aligned}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"--lr-decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if not 0 <= self.lr_final <= 1:
            raise ConfigError(f"--lr-final must be within 0…1 (a fraction of --lr), got {self.lr_final}")
        if self.keep_best and not self.eval_every:
            raise ConfigError("--keep-best keeps the best held-out evaluation: give --eval-every too")
        parse_mixture(self.data)
        if self.corpus and "copy" not in parse_mixture(self.data):
            raise ConfigError(
                "--corpus is the text of copy examples: add copy to --data (e.g. --data passkey:0.5,copy:0.5)"
            )
        self.curriculum_stages()
        if self.readout_weight < 0:
            raise ConfigError(f"--readout-weight must be 0 or more, got {self.readout_weight}")
        if not 0 <= self.readout_split <= 1:
            raise ConfigError(f"--readout-split must be within 0…1, got {self.readout_split}")
        if not 0 <= self.readout_fill <= 1:
            raise ConfigError(f"--readout-fill must be within 0…1, got {self.readout_fill}")
        if self.readout_fill > 0 and self.readout_split == 0:
            raise ConfigError("--readout-fill fills the block of split probes: give --readout-split too")
        if self.fam_growth_weight < 0:
            raise ConfigError(f"--fam-growth-weight must be 0 or more, got {self.fam_growth_weight}")
        parse_range(self.passkey_tokens, "--passkey-tokens")
        parse_range(self.copy_text_tokens, "--copy-text-tokens")

    def curriculum_stages(self) -> list[int]:
        """The curriculum's PassKey lengths in blocks (empty without a curriculum)."""
        if not self.curriculum:
            return []
        try:
            stages = [int(x) for x in self.curriculum.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--curriculum must be block counts like 2,4,8,16, got {self.curriculum!r}") from None
        if not stages or any(n <= 0 for n in stages) or stages != sorted(stages):
            raise ConfigError(f"--curriculum must be increasing positive block counts, got {self.curriculum!r}")
        return stages

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_config(
    out: str | None, resume: str | None, overrides: dict, command: str, printing: bool = False
) -> tuple[TrainConfig, bool]:
    """The run's settings and whether it resumes: the defaults (or the run in ``resume``'s saved settings), then
    ``overrides`` (a recipe's and the options given, by TrainConfig name); ``command`` is what started it.
    ``printing``: the settings are only shown, so no run directory is needed."""
    if resume:
        saved = Path(resume) / TRAIN_CONFIG
        if not saved.is_file():
            raise ConfigError(f"{resume} is not a training run to resume (no {TRAIN_CONFIG})")
        config = TrainConfig.from_dict(json.loads(saved.read_text()))
        config = replace(config, out=str(resume), stage_command=command, **overrides)
        config.command = f"{config.command}  (resumed: {command})"
        return config, True
    if not out and not printing:
        raise ConfigError("train needs --out DIR (or --resume DIR)")
    if out and not printing and (Path(out) / CHECKPOINT_DIR).exists():
        raise ConfigError(f"{out} already holds a training run; use --resume {out} or another --out")
    return replace(TrainConfig(out=out or "", command=command, stage_command=command), **overrides), False

"""A training run's settings (``TrainConfig``) and the ``python -m famviz train`` options that fill them.

The config is saved with the run (``train_config.json``), so ``--resume`` continues with the same settings
and options given again override them.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.core.config import FamConfig
from famviz.errors import ConfigError
from famviz.training.data import parse_mixture, parse_range

USED_TEXTS = ("text", "filler", "mix")  # what a used memory has read: real text, PassKey filler, either

if TYPE_CHECKING:
    import argparse

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
        if self.mode not in ("fam", "bswa"):
            raise ConfigError(f"training mode must be fam or bswa, got {self.mode!r}")
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


# -- command line ----------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m famviz train`` (defaults: TrainConfig; None = keep the resumed run's)."""
    d = TrainConfig(out="")
    parser.add_argument("--out", metavar="DIR", help="output directory: the adapter, checkpoints, logs")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument(
        "--recipe",
        metavar="FILE.toml",
        help="the run's settings from a recipe file (TrainConfig names, e.g. lr = 1e-4; assets/recipes/ holds the "
        "shipped adapters'); options given here override it",
    )
    parser.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the run's settings (the recipe, the options given and the defaults) as a recipe file and exit",
    )
    parser.add_argument("--model", default=None, help="HF id or local path (default: the bundled SmolLM2-135M)")
    parser.add_argument("--mode", choices=("fam", "bswa"), default=None, help=f"default {d.mode}")
    for name, kind, help_text in (
        ("block_size", int, "tokens per block"),
        ("fam_len", int, "FAM slots per layer"),
        ("mem_blocks", int, "cached memory blocks"),
        (
            "fam_norm",
            str,
            "grow (the paper's) or keep: each FAM slot rescaled to its norm before the update, so new writes "
            "stay visible as the memory ages",
        ),
        ("steps", int, "optimiser steps in total"),
        ("lr", float, "LoRA learning rate"),
        ("prompt_lr", float, "FAM prompt learning rate (default: --lr)"),
        ("warmup_steps", int, "linear warm-up steps"),
        ("lr_decay", str, "learning-rate decay after warm-up: none, linear or cosine (to lr × lr-final at --steps)"),
        ("lr_final", float, "the decayed learning rate at --steps, as a fraction of --lr"),
        ("batch_size", int, "sequences per step (per process)"),
        ("lora_rank", int, "LoRA rank"),
        ("lora_alpha", float, "LoRA alpha (default 2×rank)"),
        ("data", str, "mixture, e.g. passkey:0.8,copy:0.2"),
        ("passkey_tokens", str, "PassKey prompt length range in tokens, e.g. 256-2048"),
        ("passkey_depth_zero", float, "share of PassKey prompts with the key at depth 0"),
        (
            "passkey_aligned",
            float,
            "share of PassKey prompts a whole number of blocks long (minus 0-6 tokens), "
            "so that the answer is read from the FAM alone",
        ),
        ("copy_text_tokens", str, "text length range of copy examples"),
        ("copy_len", int, "tokens to repeat"),
        ("copy_weight", float, "loss weight of repeated tokens (paper: 0.1)"),
        ("text_weight", float, "loss weight of ordinary next-token prediction on the copy text"),
        ("readout_weight", float, "PassKey read-out probe after every block, weight of its answer (0 = off)"),
        (
            "readout_split",
            float,
            "share of steps whose probes end a block after the question, the answer read "
            "from the FAM alone as at round prompt lengths",
        ),
        (
            "readout_fill",
            float,
            "share of split steps whose question block starts with the stream's next tokens, so the "
            "question ends a full block of text (the FAM update then reads the text too)",
        ),
        (
            "fam_growth_weight",
            float,
            "loss weight of the FAM's norm growth: mean over updates and layers of max(0, Δ log norm), "
            "against the ~linear growth of a memory fed back into itself",
        ),
        (
            "curriculum",
            str,
            "PassKey lengths in blocks, e.g. 2,4,8,16: the next when held-out accuracy reaches the threshold",
        ),
        ("curriculum_threshold", float, "held-out accuracy that advances the curriculum"),
        ("init_from", str, "start from this adapter directory's LoRA and FAM prompt (fresh optimizer)"),
        ("rsp_prob", float, "Random State Passing probability (paper: 0.8)"),
        (
            "used_state_prob",
            float,
            "share of PassKey steps written into a used memory: the FAM first reads real text without gradient",
        ),
        ("used_state_blocks", str, "blocks of text a used memory has read, a range such as 1-16"),
        ("eval_every", int, "held-out PassKey evaluation every N steps (0 = never)"),
        ("eval_trials", int, "held-out PassKey prompts per evaluation"),
        ("eval_tokens", int, "length of held-out PassKey prompts"),
        ("eval_depth", float, "depth of the held-out prompts' key, 0…1 (0.5: written into a memory that read text)"),
        ("checkpoint_every", int, "checkpoint every N steps"),
        ("max_minutes", float, "stop after this wall time (checkpoint and adapter are written)"),
        ("seed", int, "random seed"),
        ("dtype", str, "float32 or bfloat16"),
        ("adapter_dtype", str, "store the adapter's LoRA weights as float16/bfloat16 (half the file size)"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help=f"{help_text} (default {getattr(d, name)})"
        )
    parser.add_argument(
        "--corpus",
        action="append",
        default=None,
        metavar="PATH",
        help="train on your own text (repeatable): a directory of documents (.txt .md .pdf .html), "
        "a .jsonl file with a 'text' field, or a Hugging Face dataset (.parquet/.arrow files or a "
        "save_to_disk directory); ~1%% of its documents are held out. Default: the machine's text",
    )
    parser.add_argument(
        "--no-rpo", dest="rpo", action="store_false", default=None, help="disable Random Position Offset"
    )
    parser.add_argument(
        "--used-state-reads",
        choices=USED_TEXTS,
        default=None,
        help=f"what a used memory has read: real text, the PassKey filler, or either at even odds "
        f"(default {d.used_state_reads})",
    )
    parser.add_argument("--no-rsp", dest="rsp", action="store_false", default=None, help="disable Random State Passing")
    parser.add_argument(
        "--rsp",
        dest="rsp",
        action="store_true",
        default=None,
        help="enable Random State Passing (the default; e.g. to turn it on when resuming a run)",
    )
    parser.add_argument(
        "--no-checkpoint-layers",
        dest="checkpoint_layers",
        action="store_false",
        default=None,
        help="keep every layer's activations instead of recomputing them in backward (faster, more memory)",
    )
    parser.add_argument(
        "--keep-best",
        dest="keep_best",
        action="store_true",
        default=None,
        help="write the adapter of the best held-out evaluation so far (accuracy, then key log-prob) to DIR/best",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default auto: Accelerate's device)")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's settings: the defaults (or the resumed run's), then the --recipe file's, then the options given."""
    from famviz.training.recipe import read_recipe

    overrides = read_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    overrides |= {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if f.name not in ("out", "command") and getattr(args, f.name, None) is not None
    }
    argv = getattr(args, "argv", None) or []  # famviz.cli.main sets it; a Namespace built in Python has none
    command = (
        "python -m famviz " + " ".join(shlex.quote(a) for a in argv) if argv else "python -m famviz train (from Python)"
    )
    if args.resume:
        saved = Path(args.resume) / TRAIN_CONFIG
        if not saved.is_file():
            raise ConfigError(f"{args.resume} is not a training run to resume (no {TRAIN_CONFIG})")
        config = TrainConfig.from_dict(json.loads(saved.read_text()))
        config = replace(config, out=str(args.resume), stage_command=command, **overrides)
        config.command = f"{config.command}  (resumed: {command})"
        return config, True
    printing = getattr(args, "print_recipe", False)  # nothing is written: no run directory needed
    if not args.out and not printing:
        raise ConfigError("train needs --out DIR (or --resume DIR)")
    if args.out and not printing and (Path(args.out) / CHECKPOINT_DIR).exists():
        raise ConfigError(f"{args.out} already holds a training run; use --resume {args.out} or another --out")
    return replace(TrainConfig(out=args.out or "", command=command, stage_command=command), **overrides), False

"""``famviz train``: fine-tune the FAM (LoRA + learned FAM prompt) or a BSWA baseline; the options fill a
``TrainConfig`` (defaults < a recipe file < the options given), ``famviz.training.loop`` runs it."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.core.modes import mode_names
from famviz.training.config import USED_TEXTS, TrainConfig, resolve_config  # light: no torch

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("famviz.training")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="fine-tune the FAM (LoRA + learned FAM prompt) or a BSWA baseline")
    add_train_options(parser)
    parser.set_defaults(handler=run)


# The options that set one TrainConfig field each: (field, type, help). Their default is the field's (None on the
# command line, so that a recipe or a resumed run's value stays unless the option is given).
VALUED_OPTIONS: tuple[tuple[str, type, str], ...] = (
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
)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``famviz train`` (defaults: TrainConfig; None = keep the resumed run's)."""
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
    parser.add_argument("--mode", choices=mode_names("trainable"), default=None, help=f"default {d.mode}")
    for name, kind, help_text in VALUED_OPTIONS:
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
    _add_switches(parser, d)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default auto: Accelerate's device)")


def _add_switches(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The on/off options (None unless given, like the valued ones)."""
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
    printing = getattr(args, "print_recipe", False)
    return resolve_config(args.out, args.resume, overrides, command, printing)


def run(args: argparse.Namespace) -> int:
    from famviz.training.loop import setup_trainer
    from famviz.training.recipe import recipe_text

    config, resume = config_from_args(args)
    config.validate()  # before anything is written or logged
    if getattr(args, "print_recipe", False):
        print(recipe_text(config), end="")
        return 0
    out = Path(config.out)
    # Logging is set up before the Trainer creates its Accelerator (which would tell is_main_process), so the
    # main process is read from RANK, which accelerate launch and torchrun set for every process. Only it
    # writes train.log, logs progress and prints the run directory; the others log warnings only.
    main_process = os.environ.get("RANK", "0") == "0"
    famviz_log = logging.getLogger("famviz")
    famviz_log.setLevel(logging.INFO if main_process else logging.WARNING)
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in logging.getLogger().handlers + famviz_log.handlers
    ):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        famviz_log.addHandler(stream)
    created = main_process and not out.exists()
    trainer, setup_log = setup_trainer(config)  # a run that cannot start fails here, before its directory exists
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log") if main_process else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setup_log.setTarget(handler)  # the setup's messages go into train.log too
    setup_log.close()
    famviz_log.removeHandler(setup_log)
    famviz_log.addHandler(handler)
    log.info("training %s: %s", config.mode, json.dumps(asdict(config)))
    try:
        trainer.run(resume=resume)
    except BaseException:
        if created and trainer.step == 0:  # nothing trained: leave no run directory behind
            handler.close()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        famviz_log.removeHandler(handler)
        handler.close()
    if main_process:
        print(str(out))
    return 0

"""The training card of a run (``TRAINING_CARD.md`` and its JSON): recipe, data mixture, every stage
(command, steps, tokens, wall time, held-out PassKey), hardware, and the evaluations added later."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from famviz.training.config import LORA_TARGETS, TrainConfig
from famviz.training.data import parse_mixture
from famviz.training.recipe import recipe_text

if TYPE_CHECKING:
    from famviz.training.loop import Trainer

LOSS_WINDOW = 50  # steps the progress bar's and the card's mean training loss average over, at most


def recent_loss(history: list[dict], window: int = LOSS_WINDOW) -> tuple[float | None, int]:
    """The mean loss of the last ``window`` training steps in ``history``, and how many steps it averages
    (fewer in a short run): (None, 0) before the first step."""
    losses = []
    for record in reversed(history):  # from the end: the bar asks after every step of a long run
        if len(losses) == window:
            break
        if "loss" in record:
            losses.append(record["loss"])
    return (sum(losses) / len(losses) if losses else None), len(losses)


def stage_summaries(history: list[dict], first_command: str = "") -> list[dict]:
    """One record per invocation of a run (``stage`` markers in the history): its command, steps, tokens,
    wall time and the last held-out PassKey evaluation it made. Steps recorded before any marker (runs
    made before famviz kept them) form one first stage with ``first_command``."""
    stages: list[dict] = []

    def start(from_step: int, command: str) -> None:
        stages.append(
            {
                "stage": len(stages) + 1,
                "command": command,
                "first_step": from_step + 1,
                "last_step": from_step,
                "tokens": 0,
                "wall_seconds": 0.0,
                "held_out": None,
            }
        )

    for record in history:
        if "stage" in record:
            start(record["from_step"], record["command"])
            continue
        if not stages and ("loss" in record or "eval" in record):
            start(0, first_command or "(not recorded)")
        if "loss" in record:
            stage = stages[-1]
            stage["last_step"] = record["step"]
            stage["tokens"] += record["tokens"]
            stage["wall_seconds"] = round(stage["wall_seconds"] + record.get("seconds", 0.0), 1)
        elif "eval" in record:
            stages[-1]["held_out"] = dict(
                step=record["step"],
                **record["eval"],
                **({"curriculum_blocks": record["curriculum_blocks"]} if "curriculum_blocks" in record else {}),
            )
    return stages


def previous_card(directory: Path) -> dict:
    from famviz.io.adapters import read_training_card

    try:
        return read_training_card(directory)
    except Exception:  # noqa: BLE001 - no card yet (a new run) or an unreadable one: nothing to carry over
        return {}


def initialised_from(directory: str | None, depth: int = 0) -> dict | None:
    """What a run started from with --init-from: the source adapter's own card in brief, and the run that
    one started from inside it (read again from its directory where it is still there, so lineages
    recorded before they were nested come out whole)."""
    if not directory:
        return None
    card = previous_card(Path(directory))
    origin = card.get("initialised_from")
    if origin and origin.get("directory") and Path(origin["directory"]).is_dir() and depth < 32:
        origin = initialised_from(origin["directory"], depth + 1)
    return {
        "directory": directory,
        "steps": card.get("steps"),
        "tokens_seen": card.get("tokens_seen"),
        "wall_seconds": card.get("wall_seconds"),
        "command": card.get("command"),
        "stages": card.get("stages") or None,
        "stage_evaluations": card.get("stage_evaluations") or None,
        "initialised_from": origin,  # the whole lineage, one run inside the next
    }


def text_sources(trainer: Trainer) -> dict | str | None:
    """The card's record of the training text: the corpus (paths, counts, held-out split, unreadable
    documents skipped) or the machine's text files."""
    if trainer.text is None:
        return None
    described = trainer.text.documents.describe()
    if isinstance(described, dict):
        described = dict(described, unreadable_skipped=len(trainer.text.unreadable))
    return described


def best_evaluation(history: list[dict]) -> dict | None:
    kept = [r for r in history if r.get("kept_best")]
    return dict(step=kept[-1]["step"], **kept[-1]["eval"]) if kept else None


def schedule_words(config: TrainConfig) -> str:
    if config.lr_decay == "none":
        return "constant"
    return f"{config.lr_decay} decay to {config.lr_final:g} × lr at step {config.steps}"


def training_card(trainer: Trainer, wall_seconds: float, stopped_early: bool) -> dict:
    config = trainer.config
    steps = [r for r in trainer.history if "loss" in r]
    evals = [r for r in trainer.history if "eval" in r]
    device = trainer.loaded.device
    if device.type == "cuda":
        hardware = f"{trainer.accelerator.num_processes} × {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        if trainer.accelerator.num_processes > 1:
            hardware = f"{trainer.accelerator.num_processes} processes × {hardware}"
    final_loss, final_loss_steps = recent_loss(steps)
    note = None
    if device.type != "cuda":
        note = (
            "Reduced CPU recipe: trained on a CPU with far fewer steps and shorter sequences than the paper's "
            "GPU recipe (docs/algorithm.md §6); see the evaluation before relying on it."
        )
    return {
        "note": note,
        "command": config.command,
        "recipe": recipe_text(config),  # every setting as run: famviz train --recipe FILE repeats it
        "base_model": trainer.loaded.name,
        "mode": config.mode,
        "fam": config.fam_config().to_dict(),
        "steps": trainer.step,
        "stopped_early": stopped_early,
        "tokens_seen": sum(r["tokens"] for r in steps),
        "batch_size": config.batch_size,
        "optimizer": f"AdamW (betas 0.9/0.99), lr {config.lr}, prompt lr {config.prompt_lr or config.lr}, "
        f"warm-up {config.warmup_steps} steps then {schedule_words(config)}, grad clip {config.grad_clip}",
        "lora": {
            "rank": config.lora_rank,
            "alpha": config.lora_alpha or 2 * config.lora_rank,
            "targets": list(LORA_TARGETS),
        },
        "fam_prompt": "trained in full" if config.fam_config().active_fam_len else None,
        "data_mixture": {
            "weights": parse_mixture(config.data),
            "passkey_tokens": config.passkey_tokens,
            "passkey_depth_zero": config.passkey_depth_zero,
            "passkey_aligned": config.passkey_aligned,
            "copy_text_tokens": config.copy_text_tokens,
            "copy_len": config.copy_len,
            "copy_weight": config.copy_weight,
            "text_weight": config.text_weight,
            "readout_weight": config.readout_weight,
            "readout_split": config.readout_split,
            "readout_fill": config.readout_fill,
            "fam_growth_weight": config.fam_growth_weight,
            "curriculum_blocks": config.curriculum,
            "curriculum_threshold": config.curriculum_threshold if config.curriculum else None,
            "curriculum_reached_blocks": trainer.curriculum_blocks,
            "text_sources": text_sources(trainer),
        },
        "initialised_from": initialised_from(config.init_from),
        "stages": stage_summaries(trainer.history, config.command.split("  (resumed: ")[0]),
        "stage_evaluations": previous_card(trainer.out).get("stage_evaluations", []),
        "checkpoint_layers": config.checkpoint_layers,
        "rpo": config.rpo,
        "rsp": config.rsp,
        "rsp_prob": config.rsp_prob if config.rsp else None,
        "used_state_prob": config.used_state_prob or None,  # PassKey steps written into a FAM that read text
        "used_state_blocks": config.used_state_blocks if config.used_state_prob else None,
        "used_state_reads": config.used_state_reads if config.used_state_prob else None,
        "used_state_filler_steps": sum(1 for r in trainer.history if r.get("used_reads") == "filler") or None,
        "used_state_steps": sum(1 for r in trainer.history if r.get("used_blocks")),
        "hardware": hardware,
        "dtype": config.dtype,
        "wall_seconds": round(wall_seconds, 1),
        "lora_storage_dtype": config.adapter_dtype or config.dtype,
        # the key keeps its name (cards already written have it); the count says how many steps it averages
        "final_loss_mean_last_50": final_loss,
        "final_loss_steps": final_loss_steps,
        "held_out_passkey_during_training": [dict(step=r["step"], **r["eval"]) for r in evals],
        "best_held_out": best_evaluation(trainer.history),  # what --keep-best wrote to best/
        "evaluation": {},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }

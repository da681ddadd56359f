"""Checkpoints of a run: the trainable weights (LoRA + FAM prompt), optimizer, step, RNG and RSP states,
written atomically so that ``--resume`` continues exactly.

Not ``Accelerator.save_state``: that saves whole prepared models (here ~135M frozen weights per checkpoint
instead of ~5 MB of LoRA and prompt), and knows nothing of the run's own state (the example generator, the
FAM that RSP passes on, the log history), which ``--resume`` needs to continue on the same examples."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from famviz.errors import ConfigError
from famviz.training.rpo_rsp import StatePassing

if TYPE_CHECKING:
    from peft import PeftModel


def trainable_state(peft_model: PeftModel, prompt: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = {f"lora.{k}": v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    if prompt is not None:
        state["fam_prompt"] = prompt.detach().cpu().clone()
    return state


def save_checkpoint(
    directory: Path,
    peft_model: PeftModel,
    prompt: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: random.Random,
    state_passing: StatePassing,
    history: list,
) -> None:
    """Everything needed to continue exactly: weights, optimizer, step, data/RNG states, RSP state."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(peft_model, prompt), str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rsp_saved": None if state_passing.saved is None else [t.cpu() for t in state_passing.saved],
            "history": history,
        },
        tmp / "state.pt",
    )
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # a checkpoint is either complete or absent


def load_checkpoint(
    directory: Path,
    peft_model: PeftModel,
    prompt: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    state_passing: StatePassing,
    device: torch.device | str,
) -> tuple[int, list]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (directory / "state.pt").is_file():
        raise ConfigError(f"{directory} holds no complete checkpoint to resume from")
    tensors = load_file(str(directory / "trainable.safetensors"))
    lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
    set_peft_model_state_dict(peft_model, lora)
    if prompt is not None:
        with torch.no_grad():
            prompt.copy_(tensors["fam_prompt"].to(prompt.device))
    saved = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)  # no pickled code runs
    optimizer.load_state_dict(saved["optimizer"])
    rng.setstate(saved["python_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    if saved["rsp_saved"] is not None:
        state_passing.saved = tuple(t.to(device) for t in saved["rsp_saved"])
    return saved["step"], saved["history"]

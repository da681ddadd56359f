"""Adapter directories: a trained FAM prompt (and optionally LoRA weights) for one base model.

Layout of ``DIR``:
    famviz_adapter.json     {"format": "famviz-adapter", "base_model", "model_type", "hidden_size",
                             "n_layers", "fam": {mode, block_size, fam_len, mem_blocks}, ...}
    fam_prompt.safetensors  tensor "fam_prompt" of shape (fam_len, hidden_size)
    adapter_config.json + adapter_model.safetensors   (optional) a peft LoRA adapter, merged on load
Training (``python -m famviz train``) writes these; ``--adapter DIR`` reads them everywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import FamConfig
from .errors import AdapterError
from .models import LoadedModel

ADAPTER_FORMAT = "famviz-adapter"
ADAPTER_META = "famviz_adapter.json"
PROMPT_FILE = "fam_prompt.safetensors"


@dataclass
class Adapter:
    directory: Path
    meta: dict
    fam_prompt: torch.Tensor | None

    @property
    def fam_config(self) -> dict:
        return self.meta.get("fam", {})


def read_adapter(directory: str | Path) -> Adapter:
    directory = Path(directory)
    meta_path = directory / ADAPTER_META
    if not meta_path.is_file():
        raise AdapterError(f"{directory} is not a famviz adapter (no {ADAPTER_META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {meta_path}: {exc}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{meta_path} is not a famviz adapter description")
    prompt = None
    if (directory / PROMPT_FILE).is_file():
        from safetensors.torch import load_file

        try:
            prompt = load_file(str(directory / PROMPT_FILE))["fam_prompt"]
        except Exception as exc:  # noqa: BLE001 - a damaged file is the user's to fix
            raise AdapterError(f"cannot read the FAM prompt in {directory}: {exc}") from None
    return Adapter(directory=directory, meta=meta, fam_prompt=prompt)


def check_compatible(adapter: Adapter, loaded: LoadedModel, config: FamConfig) -> None:
    """Refuse an adapter made for another base model or another FAM geometry."""
    cfg = loaded.config
    expected = {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "n_layers": cfg.num_hidden_layers}
    for key, value in expected.items():
        if adapter.meta.get(key) != value:
            raise AdapterError(
                f"adapter {adapter.directory} was made for a model with {key}={adapter.meta.get(key)!r}, "
                f"this model has {key}={value!r} (base model of the adapter: {adapter.meta.get('base_model')!r})"
            )
    if config.mode == "fam" and adapter.fam_prompt is not None:
        trained_len = adapter.fam_config.get("fam_len")
        if trained_len != config.fam_len:
            raise AdapterError(
                f"adapter {adapter.directory} was trained with fam_len={trained_len}, the run asks for fam_len={config.fam_len}"
            )


def apply_adapter(directory: str | Path, loaded: LoadedModel, config: FamConfig) -> torch.Tensor | None:
    """Merge the adapter's LoRA weights into ``loaded`` (in place) and return its FAM prompt."""
    adapter = read_adapter(directory)
    check_compatible(adapter, loaded, config)
    if (adapter.directory / "adapter_config.json").is_file():
        try:
            from peft import PeftModel

            merged = PeftModel.from_pretrained(loaded.model, str(adapter.directory)).merge_and_unload()
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"cannot apply the LoRA weights in {adapter.directory}: {exc}") from None
        loaded.model = merged.eval().requires_grad_(False)
    if adapter.fam_prompt is None or config.mode != "fam":
        return None
    return adapter.fam_prompt.to(device=loaded.device, dtype=loaded.dtype)

"""The model the engine runs: which decoder families it supports, and a loaded causal LM with its name.

Where a model comes from (the bundled GGUF, a Hub id, a directory) is ``famviz.io.models``' concern; the
engine needs only what is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from famviz.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ArchSpec:
    """What differs between supported decoder families; everything else is shared.

    All follow the pre-norm pattern: x + attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)),
    with separate q/k/v/o projections and rotate-half RoPE.
    """

    qk_norm: bool  # per-head RMSNorm on queries and keys before RoPE (Qwen3)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(qk_norm=False),
    "mistral": ArchSpec(qk_norm=False),
    "qwen2": ArchSpec(qk_norm=False),
    "qwen3": ArchSpec(qk_norm=True),
}


def supported_families() -> str:
    return ", ".join(sorted(ARCHITECTURES))


UNTUNED_LABEL = "untuned conversion"


def describe_model(name: str | None, adapter: str | None, *, adapter_known: bool = True) -> str:
    """ "NAME + adapter X", or "NAME (untuned conversion)" when no adapter was merged; with
    ``adapter_known`` False (an old trace that did not record it) just the name."""
    name = name or "unknown model"
    if adapter:
        return f"{name} + adapter {adapter}"
    return f"{name} ({UNTUNED_LABEL})" if adapter_known else name


@dataclass
class LoadedModel:
    """A causal LM ready for the FAM engine."""

    model: torch.nn.Module  # a *ForCausalLM
    tokenizer: object
    name: str
    arch: ArchSpec
    adapter: str | None = None  # the name of the adapter merged into ``model`` (set by ``apply_adapter``)

    @property
    def label(self) -> str:
        """Which model and adapter produce results: for status lines, captions and saved results."""
        return describe_model(self.name, self.adapter)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def check_supported(model: torch.nn.Module) -> ArchSpec:
    """The model's ArchSpec, or an UnsupportedModelError naming what is supported."""
    model_type = getattr(model.config, "model_type", "?")
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by the FAM engine; supported families: {supported_families()}"
        )
    layer = model.model.layers[0]
    required = [
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ] + (["self_attn.q_norm", "self_attn.k_norm"] if spec.qk_norm else [])
    missing = [name for name in required if _get_attr_path(layer, name) is None]
    if missing:
        raise UnsupportedModelError(
            f"model type {model_type!r} does not have the expected pre-norm decoder layout "
            f"(missing {', '.join(missing)})"
        )
    return spec


def _get_attr_path(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def prepare_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, name: str) -> LoadedModel:
    """Wrap an already built causal LM (e.g. a tiny random one in tests)."""
    arch = check_supported(model)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, arch=arch)

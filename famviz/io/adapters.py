"""Adapter directories: a trained FAM prompt (and optionally LoRA weights) for one base model.

Layout of ``DIR``:
    famviz_adapter.json     {"format": "famviz-adapter", "base_model", "model_type", "hidden_size",
                             "n_layers", "fam": {mode, block_size, fam_len, mem_blocks}, ...}
    fam_prompt.safetensors  tensor "fam_prompt" of shape (fam_len, hidden_size)
    adapter_config.json + adapter_model.safetensors   (optional) a peft LoRA adapter, merged on load
Training (``python -m famviz train``) writes these; ``--adapter DIR`` reads them everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from famviz.core.config import TOOL_DEFAULTS, FamConfig
from famviz.core.model import LoadedModel
from famviz.core.modes import MODE_TABLE, mode_names
from famviz.errors import AdapterError

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_FORMAT = "famviz-adapter"
ADAPTER_META = "famviz_adapter.json"
PROMPT_FILE = "fam_prompt.safetensors"
# Adapters trained with ``famviz train`` that come with the repository (assets/ beside the package).
SHIPPED_ADAPTERS = Path(__file__).resolve().parents[2] / "assets" / "adapters"
# The bundled model's default tuned FAM: it retrieves most pass keys from its FAM alone and, over long
# documents, predicts as well as its own weights without memory, below the untuned model without memory
# (its card, greedy: 96% at 512, 92% at 2,048, 64% at 4,096, 50% at 8,192 tokens; BSWA and attention sinks
# retrieve none; GPL-3 NLL 0.91x untuned BSWA's).
SHIPPED_ADAPTER = SHIPPED_ADAPTERS / "smollm2-135m-fam64-block256-mem0-balanced"
LORA_FILE = "adapter_model.safetensors"  # written by peft


@dataclass
class Adapter:
    directory: Path
    meta: dict
    fam_prompt: torch.Tensor | None

    @property
    def fam_config(self) -> dict:
        return self.meta.get("fam", {})

    def trained_config(self, default: FamConfig = TOOL_DEFAULTS) -> FamConfig:
        """The FAM geometry the adapter was trained with (``default``'s for anything not recorded)."""
        names = {f.name for f in dataclasses.fields(FamConfig)}
        return dataclasses.replace(default, **{k: v for k, v in self.fam_config.items() if k in names})


# The settings run_geometry fills: an option's name on the command line, a FamConfig field.
GEOMETRY_SETTINGS = ("block_size", "fam_len", "mem_blocks", "sink_tokens", "fam_norm")


def run_geometry(
    adapter: Adapter | None, mode: str = "fam", default: FamConfig = TOOL_DEFAULTS, **given: object
) -> FamConfig:
    """A run's FAM geometry, the one rule of the CLI's commands and ``evaluate`` (the app shows the same as its
    controls' values): each setting in ``given`` that is not None, else the adapter's trained one, else
    ``default``'s. ``given``: FamConfig field names (``GEOMETRY_SETTINGS``)."""
    base = adapter.trained_config(default) if adapter is not None else default
    return dataclasses.replace(base, mode=mode, **{name: value for name, value in given.items() if value is not None})


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


def run_notes(config: FamConfig, adapter: Adapter | None) -> list[str]:
    """What a run's status (or the CLI's stderr) should say about its settings: geometry that is allowed but
    probably not meant, and how it differs from what ``adapter`` was trained with."""
    from famviz.core.config import geometry_warnings, trained_geometry_differences

    notes = geometry_warnings(config)
    if adapter is not None:
        notes += trained_geometry_differences(adapter.trained_config(), config, adapter.directory.name)
    return notes


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
    if config.active_fam_len and adapter.fam_prompt is not None:
        trained_len = adapter.fam_config.get("fam_len")
        if trained_len != config.fam_len:
            # Its learned initial FAM has exactly this many slots: no other length has a trained meaning.
            raise AdapterError(
                f"the adapter {adapter.directory.name}'s memory has {trained_len} slots, so the FAM length must "
                f"be {trained_len} with it (this run asks for {config.fam_len}); choose FAM length {trained_len}, "
                "or no adapter to try another length"
            )


@contextlib.contextmanager
def peft_quiet() -> Iterator[None]:
    """peft asks transformers for ``is_gradient_checkpointing``, a name transformers has deprecated: a
    FutureWarning a user can do nothing about, printed at every adapter load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_adapter(directory: str | Path, loaded: LoadedModel, config: FamConfig) -> torch.Tensor | None:
    """Merge the adapter's LoRA weights into ``loaded`` (in place) and return its FAM prompt."""
    adapter = read_adapter(directory)
    check_compatible(adapter, loaded, config)
    if (adapter.directory / "adapter_config.json").is_file():
        try:
            from peft import PeftModel

            with peft_quiet():
                merged = PeftModel.from_pretrained(loaded.model, str(adapter.directory)).merge_and_unload()
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"cannot apply the LoRA weights in {adapter.directory}: {exc}") from None
        loaded.model = merged.eval().requires_grad_(False)
    loaded.adapter = adapter.directory.name
    if adapter.fam_prompt is None or not config.active_fam_len:
        return None
    return adapter.fam_prompt.to(device=loaded.device, dtype=loaded.dtype)


# -- writing (``python -m famviz train``) ---------------------------------------------------------
CARD_JSON = "training_card.json"
CARD_MARKDOWN = "TRAINING_CARD.md"


def adapter_meta(loaded: LoadedModel, config: FamConfig, has_prompt: bool) -> dict:
    """The description ``read_adapter``/``check_compatible`` expect: base model and FAM geometry."""
    cfg = loaded.config
    return {
        "format": ADAPTER_FORMAT,
        "base_model": loaded.name,
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "fam": config.to_dict(),
        "has_fam_prompt": has_prompt,
    }


def write_adapter(
    directory: str | Path,
    loaded: LoadedModel,
    config: FamConfig,
    fam_prompt: torch.Tensor | None,
    peft_model: PeftModel | None = None,
    lora_dtype: torch.dtype | None = None,
) -> Path:
    """Write an adapter directory: description, FAM prompt (fam mode) and the peft LoRA weights.

    ``lora_dtype``: store the LoRA weights in this dtype (e.g. float16 halves the file; they are cast back
    to the model's dtype when merged). None keeps the training dtype, so save/load round-trips exactly.
    """
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fam_prompt is not None:
        if not config.active_fam_len or tuple(fam_prompt.shape) != (config.fam_len, loaded.config.hidden_size):
            raise AdapterError(f"FAM prompt of shape {tuple(fam_prompt.shape)} does not fit {config}")
        save_file({"fam_prompt": fam_prompt.detach().cpu().contiguous().clone()}, str(directory / PROMPT_FILE))
    else:
        (directory / PROMPT_FILE).unlink(missing_ok=True)
    if peft_model is not None:
        for lora_config in peft_model.peft_config.values():  # the base model by name, not a local cache path
            lora_config.base_model_name_or_path = loaded.name
        peft_model.save_pretrained(str(directory))
        weights = directory / LORA_FILE
        if lora_dtype is not None and weights.is_file():
            tensors = load_file(str(weights))
            save_file({k: v.to(lora_dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(weights))
    (directory / ADAPTER_META).write_text(json.dumps(adapter_meta(loaded, config, fam_prompt is not None), indent=2))
    return directory


def write_training_card(directory: str | Path, card: dict) -> None:
    """The training card twice: ``training_card.json`` and a readable ``TRAINING_CARD.md``."""
    directory = Path(directory)
    (directory / CARD_JSON).write_text(json.dumps(card, indent=2))
    (directory / CARD_MARKDOWN).write_text(card_markdown(card))


def read_training_card(directory: str | Path) -> dict:
    path = Path(directory) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def final_loss_span(card: dict) -> str:
    """Which steps the card's mean training loss averages: the last 50, or all of a shorter run's."""
    steps = card.get("final_loss_steps")
    if steps is None:  # a card written before the count was kept: its run's steps, up to 50
        steps = min(50, card.get("steps") or 50)
    if steps >= 50:  # famviz.training.card.LOSS_WINDOW
        return "the last 50 steps"
    return "its only step" if steps == 1 else f"all {steps} steps (the run has fewer than 50)"


def card_markdown(card: dict) -> str:
    """The training card as Markdown (TRAINING_CARD.md): the run, its recipe and lineage, its stages, and what
    was measured during and after it."""
    sections = (_card_summary, _card_lineage, _card_stages, _card_stage_evaluations, _card_results)
    return "\n".join(line for section in sections for line in section(card))


def _card_summary(card: dict) -> list[str]:
    """The title, the note and the run in one list."""
    lines = ["# famviz adapter: training card", ""]
    if card.get("note"):
        lines += [f"**{card['note']}**", ""]
    fam = card.get("fam", {})
    lines += [
        f"- Base model: {card.get('base_model')}",
        f"- Mode: {card.get('mode')}; block {fam.get('block_size')}, FAM {fam.get('fam_len')} slots, "
        f"{fam.get('mem_blocks')} memory blocks",
        f"- Command: `{card.get('command')}`"
        + (" (every setting as run: *Recipe* below)" if card.get("recipe") else ""),
        f"- Steps: {card.get('steps')} (batch {card.get('batch_size')}, {card.get('tokens_seen')} tokens)"
        + (" — stopped early by --max-minutes" if card.get("stopped_early") else ""),
        f"- Optimiser: {card.get('optimizer')}",
        f"- LoRA: {card.get('lora')}; FAM prompt: {card.get('fam_prompt')}",
        f"- RPO: {card.get('rpo')}; RSP: {card.get('rsp')} (p = {card.get('rsp_prob')})",
        f"- Data mixture: {json.dumps(card.get('data_mixture'))}",
        f"- Hardware: {card.get('hardware')}, {card.get('dtype')}; wall time {card.get('wall_seconds')} s",
        f"- Mean training loss over {final_loss_span(card)}: {card.get('final_loss_mean_last_50')}",
        "",
    ]
    return lines


def _card_lineage(card: dict) -> list[str]:
    """The recipe as run, and the runs this one was initialised from."""
    lines = []
    if card.get("recipe"):
        lines += ["## Recipe (`famviz train --recipe FILE.toml --out DIR` repeats the run)", "", "```toml"]
        lines += [card["recipe"].rstrip("\n"), "```", ""]
    origin = card.get("initialised_from")
    if origin:
        lines += [
            "## Initialised from (each run started from the one below it)",
            "",
            "| run | steps | tokens | wall time | command |",
            "|---|---|---|---|---|",
        ]
        while origin:
            wall = origin.get("wall_seconds")
            lines.append(
                f"| `{origin.get('directory')}` | {origin.get('steps')} | {origin.get('tokens_seen')} | "
                f"{f'{wall / 60:.0f} min' if wall else '-'} | `{origin.get('command')}` |"
            )
            origin = origin.get("initialised_from")
        lines.append("")
    return lines


def _card_stages(card: dict) -> list[str]:
    """Each stage's steps, tokens, time, held-out check and command."""
    lines = []
    stages = card.get("stages") or []
    if stages:
        lines += [
            "## Stages",
            "",
            "| stage | steps | tokens | wall time | held-out PassKey at its end (teacher-forced) | command |",
            "|---|---|---|---|---|---|",
        ]
        for stage in stages:
            held = stage.get("held_out")
            held_text = (
                f"{held['length']} tokens: {held['accuracy']:.0%}, log p {held['key_logprob']:.2f}" if held else "-"
            )
            lines.append(
                f"| {stage['stage']} | {stage['first_step']}-{stage['last_step']} | {stage['tokens']:,} | "
                f"{stage['wall_seconds'] / 60:.0f} min | {held_text} | `{stage['command']}` |"
            )
        lines.append("")
    return lines


def _card_stage_evaluations(card: dict) -> list[str]:
    """The evaluations recorded after stages."""
    lines = []
    stage_evaluations = card.get("stage_evaluations") or []
    if stage_evaluations:
        lines += [
            "## Evaluations after stages",
            "",
            "| after step | PassKey (greedy): tokens: retrieved (log p) | long documents: tuned ÷ untuned BSWA NLL |",
            "|---|---|---|",
        ]
        for entry in stage_evaluations:
            cells = (
                ", ".join(
                    f"{c.get('label', '')} {c['length']}@{c['depth']:g}: {c['accuracy']:.0%} "
                    f"({c['mean_key_logprob']:.1f})"
                    for c in entry.get("passkey") or []
                )
                or "-"
            )
            docs = (
                ", ".join(
                    f"{d['document']} {d['tuned']['nll']:.3f} ÷ {d['untuned_bswa']['nll']:.3f} "
                    f"= {d['tuned_vs_bswa']:.2f}"
                    for d in entry.get("long_documents") or []
                )
                or "-"
            )
            lines.append(f"| {entry.get('after_step')} | {cells} | {docs} |")
        lines.append("")
    return lines


def _card_results(card: dict) -> list[str]:
    """The held-out checks during training, the evaluation, and a same-budget baseline."""
    lines = []
    evals = card.get("held_out_passkey_during_training") or []
    if evals:
        lines += [
            "## Held-out PassKey during training (teacher-forced)",
            "",
            "| step | tokens | accuracy | key log-prob |",
            "|---|---|---|---|",
        ]
        lines += [f"| {e['step']} | {e['length']} | {e['accuracy']:.2f} | {e['key_logprob']:.2f} |" for e in evals]
        lines.append("")
    evaluation = card.get("evaluation") or {}
    if evaluation:
        lines += ["## Evaluation", ""] + _evaluation_markdown(evaluation)
    baseline = card.get("baseline")
    if baseline:
        lines += [
            f"## Baseline trained with the same budget: {baseline.get('mode')}",
            "",
            f"- Command: `{baseline.get('command')}`",
            f"- Steps: {baseline.get('steps')}; wall time {baseline.get('wall_seconds')} s",
            "",
        ]
        lines += _evaluation_markdown(baseline.get("evaluation") or {})
    return lines


# The models of a long-document comparison (``famviz.training.evaluation.long_document_comparison``), in table order.
LONG_DOCUMENT_MODELS = (
    ("tuned", "tuned"),
    ("tuned_bswa", "tuned weights, BSWA"),
    *((f"untuned_{name}", f"untuned {MODE_TABLE[name].label}") for name in mode_names("baseline")),
)


def _long_document_markdown(rows: list[dict]) -> list[str]:
    """Long-document NLL per quarter (tuned, untuned BSWA, untuned full) and the FAM norm, one row a model."""
    if not rows:
        return []
    lines = [
        "",
        "| document | model | mean NLL | quarter 1 | quarter 2 | quarter 3 | quarter 4 | FAM norm (blocks: norm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for key, label in LONG_DOCUMENT_MODELS:
            if key not in row:
                continue
            result = row[key]
            norms = ", ".join(f"{k}: {v:.0f}" for k, v in result.get("fam_norm_after_blocks", {}).items()) or "-"
            lines.append(
                f"| {row['document']} ({row['tokens']} tokens) | {label} | {result['nll']:.3f} | "
                + " | ".join(f"{q:.3f}" for q in result["nll_quarters"])
                + f" | {norms} |"
            )
    return lines


def _evaluation_markdown(evaluation: dict) -> list[str]:
    """Each ``--evaluate`` result as a PassKey table plus the in-window loss; anything else as JSON."""
    lines: list[str] = []
    for name, result in evaluation.items():
        if name == "summary":
            continue
        if not isinstance(result, dict) or "passkey" not in result:
            lines += [f"### {name}", "", "```json", json.dumps(result, indent=2), "```", ""]
            continue
        lines += [
            f"### {name} ({result.get('dtype')}, {result.get('passkey_scoring', 'greedy decoding')})",
            "",
            "| mode | tokens | depth | trials | retrieved | mean log p(key) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c.get('label', name)} | {c['length']} | {c['depth']:g} | {c['trials']} | {c['accuracy']:.0%} | "
            f"{c['mean_key_logprob']:.2f} |"
            for c in result["passkey"]
        ]
        nll = result.get("in_window_nll") or {}
        if nll:
            same = f", untuned same mode {nll['untuned_same_mode']:.4f}" if "untuned_same_mode" in nll else ""
            lines += [
                "",
                f"Next-token loss inside one {nll.get('window_tokens')}-token window of {nll.get('text')}, "
                f"{nll.get('windows')} windows: tuned {nll['tuned']:.4f}, untuned full attention "
                f"{nll['untuned_full_attention']:.4f} ({nll['relative_change']:+.1%}){same}.",
            ]
        lines += _long_document_markdown(result.get("long_documents") or [])
        lines.append("")
    if evaluation.get("summary"):
        lines += [evaluation["summary"], ""]
    return lines

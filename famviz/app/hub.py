"""The models the app streams with and what every tab is built with.

``ModelHub`` holds the startup model and at most one other chosen in the Model panel (loaded on the next
Start, inside the queued event, so sessions never load concurrently). ``AppContext`` is the one object
every ``build_*_tab`` takes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from famviz.app import MIN_REDRAW_SECONDS
from famviz.app.inputs import error_status
from famviz.core.config import FamConfig
from famviz.core.model import LoadedModel
from famviz.errors import FamvizError
from famviz.io.adapters import SHIPPED_ADAPTER, SHIPPED_ADAPTERS, run_notes

log = logging.getLogger("famviz.app")

UNTUNED_NOTE = (
    "Untuned conversion: the FAM is the model's own layers run on a fixed prompt, never trained to "
    "remember; expect its loss to rise over a long document."
)


@dataclass
class AppAdapter:
    """A trained adapter, applied once when its model is loaded (LoRA merged); its FAM prompt is
    used in fam mode."""

    adapter: object  # famviz.io.adapters.Adapter
    fam_prompt: torch.Tensor | None

    @property
    def directory(self) -> Path:
        return self.adapter.directory

    def settings(self) -> FamConfig:
        """The FAM geometry the adapter was trained with (the app's defaults when it is loaded)."""
        return self.adapter.trained_config()

    def prompt_for(self, loaded: LoadedModel, config: FamConfig) -> torch.Tensor | None:
        """The FAM prompt for a run (``FamModel`` ignores it in modes without a FAM), or an AdapterError when
        the run's settings don't fit the adapter."""
        from famviz.io.adapters import check_compatible

        check_compatible(self.adapter, loaded, config)
        return self.fam_prompt


def attach_adapter(loaded: LoadedModel, directory: str | Path) -> AppAdapter:
    """Read an adapter directory and merge its LoRA weights into ``loaded`` (in place, once)."""
    from famviz.io.adapters import apply_adapter, read_adapter

    adapter = read_adapter(directory)
    probe = AppAdapter(adapter, None)
    prompt = apply_adapter(directory, loaded, dataclasses.replace(probe.settings(), mode="fam"))
    return AppAdapter(adapter, prompt)


def shipped_adapters() -> list[tuple[str, str]]:
    """(label, directory) of the adapters that come with famviz (trained with `famviz train`)."""
    found = []
    markers = sorted(SHIPPED_ADAPTERS.glob("*/famviz_adapter.json"), key=lambda m: (m.parent != SHIPPED_ADAPTER, m))
    for marker in markers:  # the default adapter first
        found.append(
            (f"bundled model + tuned FAM: {marker.parent.name} (see its TRAINING_CARD.md)", str(marker.parent))
        )
    return found


def model_key(model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> tuple:
    clean = lambda value: (str(value).strip() or None) if value is not None else None
    return clean(model), clean(adapter), device or "auto", dtype or "auto"


class ModelHub:
    """The models the app can stream with: the startup one, plus at most one other picked in the UI
    (loaded on Start, inside the queued stream event, so sessions never load concurrently)."""

    def __init__(self, loaded: LoadedModel, adapter: AppAdapter | None, key: tuple):
        self.default_key = key
        self._models: dict[tuple, tuple[LoadedModel, AppAdapter | None]] = {key: (loaded, adapter)}
        self._lock = threading.Lock()
        self._warm_up_done = threading.Event()
        self._warm_up_done.set()
        self._warm_up_thread: threading.Thread | None = None

    def warm_up_in_background(self, warm_up: Callable[[], object]) -> threading.Thread:
        """Run ``warm_up`` (a stream on the startup model) on a thread of its own while the page is served;
        until it ends, a run that asks for the startup model waits for it, so a user's first run neither
        shares the model with it nor pays the one-time costs it takes."""
        self._warm_up_done.clear()

        def run() -> None:
            try:
                warm_up()
            except Exception:  # the app serves without it: the first run is only slower
                log.warning("famviz: the warm-up failed; the first run will be slower", exc_info=True)
            finally:
                self._warm_up_done.set()

        self._warm_up_thread = threading.Thread(target=run, name="famviz-warm-up", daemon=True)
        self._warm_up_thread.start()
        return self._warm_up_thread

    @property
    def default(self) -> tuple[LoadedModel, AppAdapter | None]:
        if threading.current_thread() is not self._warm_up_thread:
            self._warm_up_done.wait()
        return self._models[self.default_key]

    def is_loaded(self, key: tuple) -> bool:
        return key in self._models

    def loaded_choice(
        self, model: str | None, adapter: str | None, device: str | None, dtype: str | None
    ) -> tuple[LoadedModel, AppAdapter | None] | None:
        """The Model panel's choice if it is loaded already (None: it loads on the next Start)."""
        key = model_key(model, adapter, device, dtype)
        return self._models.get(key)

    def for_choice(
        self, model: str | None, adapter: str | None, device: str | None, dtype: str | None
    ) -> tuple[LoadedModel, AppAdapter | None]:
        """The Model panel's choice: the startup model when it is the one chosen, else loaded by ``get``."""
        key = model_key(model, adapter, device, dtype)
        return self.default if key == self.default_key else self.get(*key)

    def get(
        self, model: str | None, adapter: str | None, device: str | None, dtype: str | None
    ) -> tuple[LoadedModel, AppAdapter | None]:
        key = model_key(model, adapter, device, dtype)
        with self._lock:
            if key in self._models:
                return self._models[key]
            from famviz.io.models import load_model

            loaded = load_model(key[0], device=key[2], dtype=key[3])
            app_adapter = attach_adapter(loaded, key[1]) if key[1] else None
            for other in [k for k in self._models if k != self.default_key]:
                del self._models[other]  # keep memory bounded: one extra model at a time
            self._models[key] = (loaded, app_adapter)
            return loaded, app_adapter


@dataclass
class AppContext:
    """What every tab is built with: the models, the session's current run (gr.State), the settings a
    run starts from, and the shared Model panel's components."""

    hub: ModelHub
    run_state: gr.State
    defaults: FamConfig
    redraw_seconds: float = MIN_REDRAW_SECONDS
    model_inputs: list = dataclasses.field(default_factory=list)  # the Model panel: model, adapter, device, dtype
    header: object = None  # the page's model line (gr.Markdown), redrawn when the choice changes or a run ends
    adapter_note: object = None  # under the adapter choice: the geometry it applied
    geometry_fields: list = dataclasses.field(default_factory=list)  # per tab: (block size, FAM length, memory blocks)

    def refresh_header_after(self, event: gr.events.Dependency) -> None:
        """After ``event`` (a run of either tab), the header names the model that ran."""
        event.then(
            lambda *choice: model_header(self.hub, *choice), self.model_inputs, self.header, show_progress="hidden"
        )


def model_summary(loaded: LoadedModel, adapter: AppAdapter | None) -> str:
    cfg = loaded.config
    dtype = str(loaded.dtype).replace("torch.", "")
    line = (
        f"**Model:** {loaded.name} · {cfg.num_hidden_layers} layers · {cfg.num_attention_heads} heads · "
        f"{loaded.device} · {dtype}"
    )
    if adapter is not None:
        line += f" · adapter `{Path(str(adapter.directory)).name}` (tuned FAM)"
    else:
        line += (
            " · untuned conversion: the FAM is the model's own layers run on a fixed prompt, never trained "
            "to remember, so expect its loss to rise over a long document (choose a tuned adapter in the "
            "Model panel)"
        )
    return line


def model_header(hub: ModelHub, model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> str:
    """The page's model line for the Model panel's choice: the loaded model's summary, or what loads next."""
    choice = hub.loaded_choice(model, adapter, device, dtype)
    if choice is not None:
        return model_summary(*choice)
    name = (model or "").strip() or "bundled SmolLM2-135M"
    adapter = (adapter or "").strip()
    return f"**Model (chosen, loaded on the next Start):** {name}" + (
        f" · adapter `{Path(adapter).name}`" if adapter else " · untuned conversion"
    )


def adapter_geometry(groups: int, directory: str | None) -> tuple:
    """The adapter choice: its trained geometry goes into every tab's block size, FAM length and memory
    blocks (``groups`` tabs), and the note under the choice says so."""
    directory = (directory or "").strip()
    keep = [gr.skip()] * (3 * groups)
    if not directory:
        return *keep, UNTUNED_NOTE
    try:
        from famviz.io.adapters import read_adapter

        trained = AppAdapter(read_adapter(directory), None).settings()
    except FamvizError as exc:
        return *keep, error_status(str(exc))
    values = [trained.block_size, trained.fam_len, trained.mem_blocks] * groups
    return *values, (
        f"Adapter `{Path(directory).name}` was trained with block {trained.block_size} tokens, "
        f"FAM {trained.fam_len} slots, memory blocks {trained.mem_blocks}: these settings are now "
        f"set in every tab. Other settings are allowed; the status then says how a run differs."
    )


def chosen_model(context: AppContext, model_choice: tuple | None) -> tuple[LoadedModel, AppAdapter | None]:
    """(loaded model, app adapter or None) of the Model panel's choice (model, adapter, device, dtype);
    the startup model when None. The hub loads a changed choice (inside the queued event)."""
    if model_choice is None:
        return context.hub.default
    return context.hub.for_choice(*model_choice)


def status_notes(adapter: AppAdapter | None, configs: list[FamConfig]) -> list[str]:
    """Geometry warnings and differences from the adapter's training for the runs of ``configs`` (each once)."""
    notes: list[str] = []
    for config in configs:
        for note in run_notes(config, adapter.adapter if adapter is not None else None):
            if note not in notes:
                notes.append(note)
    return notes


def notes_markdown(notes: list[str]) -> str:
    """Notes as lines under a status."""
    return "".join(f"\n\n**Note:** {note}" for note in notes)

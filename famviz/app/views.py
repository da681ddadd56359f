"""What the app's long-running handlers send, by name: one named tuple per tab panel.

A handler returns (or yields) one of these; the tab's builder wires its components in the same structure, so
the order of a handler's outputs is written once. ``only(**given)`` sends the given views and leaves every
other one as it is on the page (``gr.skip()``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import gradio as gr

Views = TypeVar("Views", bound=tuple)


def only_views(cls: type[Views], **given: Any) -> Views:
    """``cls`` with ``given`` views and ``gr.skip()`` for every other (an unknown name is a TypeError)."""
    unknown = set(given) - set(cls._fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no view named {', '.join(sorted(unknown))}")
    return cls(**{name: given[name] if name in given else gr.skip() for name in cls._fields})


class InspectorViews(NamedTuple):
    """The memory inspector's Start, Stop and replay handlers."""

    status: Any
    heatmap: Any
    heads: Any
    document: Any
    trajectory: Any
    dynamics: Any
    nll: Any
    lens: Any  # the memory lens
    slots: Any  # the per-slot views
    block: Any  # the drill-down slider
    layer: Any  # the layer dropdown
    view: Any  # the share-view dropdown
    run: Any  # the session's Run

    only = classmethod(only_views)


class PanelViews(NamedTuple):
    """A PassKey-tab panel with one plot: retention, interventions."""

    status: Any
    plot: Any
    session: Any  # the session's PasskeySession

    only = classmethod(only_views)


class SweepViews(NamedTuple):
    """The PassKey sweep."""

    status: Any
    heatmap: Any
    table: Any
    sweeps: Any  # the kept sweeps' dropdown
    session: Any

    only = classmethod(only_views)

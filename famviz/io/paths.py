"""Output paths checked before any work is done, so that a long run never ends on an unwritable file."""

from __future__ import annotations

import os
from pathlib import Path

from famviz.errors import FamvizError

FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".html")


def check_figure_path(path: str | None) -> str | None:
    """A --figure path checked before any work is done (None when no figure is asked for)."""
    if not path:
        return None
    target = check_output_path(path)
    if os.path.splitext(target)[1].lower() not in FIGURE_SUFFIXES:
        raise FamvizError("--figure must end in .png, .svg, .pdf or .html")
    return target


def check_output_path(path: str) -> str:
    """Refuse an unwritable output path before any work is done."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise FamvizError(f"{path} is a directory; give a file name such as {target / 'trace.npz'}")
    if not target.parent.is_dir():
        raise FamvizError(f"cannot write {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise FamvizError(f"cannot write {path}: folder {target.parent} is not writable")
    return str(target)

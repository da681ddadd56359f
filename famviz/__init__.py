"""famviz: turn a Hugging Face causal LM into TransformerFAM and watch its working memory.

The names below are imported on first use (PEP 562), so that ``famviz --help`` and the command line's
parsing answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {
    "MODES": "famviz.core.config",
    "FamConfig": "famviz.core.config",
    "BlockResult": "famviz.core.engine",
    "Stream": "famviz.core.engine",
    "StreamResult": "famviz.core.engine",
    "stream_tokens": "famviz.core.engine",
    "FamvizError": "famviz.errors",
    "FamModel": "famviz.core.fam_model",
    "StreamState": "famviz.core.fam_model",
    "LoadedModel": "famviz.core.model",
    "load_model": "famviz.io.models",
    "prepare_model": "famviz.core.model",
    "IncrementalTokenizer": "famviz.core.tokenize",
    "tokenize_document": "famviz.core.tokenize",
    "CHANNEL_KINDS": "famviz.core.trace",
    "Trace": "famviz.core.trace",
}
__all__ = [
    "MODES",
    "FamConfig",
    "BlockResult",
    "Stream",
    "StreamResult",
    "stream_tokens",
    "FamvizError",
    "FamModel",
    "StreamState",
    "LoadedModel",
    "load_model",
    "prepare_model",
    "IncrementalTokenizer",
    "tokenize_document",
    "CHANNEL_KINDS",
    "Trace",
]

if TYPE_CHECKING:
    from famviz.core.config import MODES, FamConfig
    from famviz.core.engine import BlockResult, Stream, StreamResult, stream_tokens
    from famviz.core.fam_model import FamModel, StreamState
    from famviz.core.model import LoadedModel, prepare_model
    from famviz.core.tokenize import IncrementalTokenizer, tokenize_document
    from famviz.core.trace import CHANNEL_KINDS, Trace
    from famviz.errors import FamvizError
    from famviz.io.models import load_model


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'famviz' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])

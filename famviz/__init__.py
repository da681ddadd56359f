"""famviz: turn a Hugging Face causal LM into TransformerFAM and watch its working memory."""

from famviz.core.config import MODES, FamConfig
from famviz.core.engine import BlockResult, Stream, StreamResult, stream_tokens
from famviz.core.fam_model import FamModel, StreamState
from famviz.core.model import LoadedModel, prepare_model
from famviz.core.tokenize import IncrementalTokenizer, tokenize_document
from famviz.core.trace import CHANNEL_KINDS, Trace
from famviz.errors import FamvizError
from famviz.io.models import load_model

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
__version__ = "0.1.0"

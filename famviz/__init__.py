"""famviz: turn a Hugging Face causal LM into TransformerFAM and watch its working memory."""
from .config import MODES, FamConfig
from .engine import BlockResult, Stream, StreamResult, stream_tokens
from .errors import FamvizError
from .fam_model import FamModel, StreamState
from .models import LoadedModel, load_model, prepare_model
from .tokenize import IncrementalTokenizer, tokenize_document
from .trace import CHANNEL_KINDS, Trace

__all__ = [
    "MODES", "FamConfig", "BlockResult", "Stream", "StreamResult", "stream_tokens", "FamvizError", "FamModel",
    "StreamState", "LoadedModel", "load_model", "prepare_model", "IncrementalTokenizer", "tokenize_document",
    "CHANNEL_KINDS", "Trace",
]
__version__ = "0.1.0"

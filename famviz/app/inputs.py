"""What the user types or uploads, checked in one place for every tab: whole numbers and number lists, the
inspector's settings, documents (examples, pasted text, uploads), and the one error format of the page.

Every check raises a ``FamvizError`` with one sentence a user can act on; the tabs show it with
``error_status`` (and beside the button that started the run).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from famviz.core.config import LIMITS, MODES, TOOL_DEFAULTS, FamConfig
from famviz.core.modes import MODE_TABLE
from famviz.errors import DocumentError, FamvizError
from famviz.io.documents import MAX_DOCUMENT_BYTES, head_bytes_for, read_document, read_upload_start

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EXAMPLE_PATH = Path("/usr/share/common-licenses/GPL-3")
SOURCES = {
    "example": "Example: GPL-3 licence",
    "passkey": "Example: PassKey haystack",
    "upload": "Upload a file",
    "paste": "Paste text",
}
DEFAULT_SETTINGS = TOOL_DEFAULTS
DEFAULT_MAX_TOKENS = 8192  # a whole typical document (GPL-3 is 7,658 tokens)
DEFAULT_PASSKEY_TOKENS = 2000
MAX_BLOCK_SIZE = LIMITS["block_size"][1]
MAX_FAM_LEN = LIMITS["fam_len"][1]
MAX_MEM_BLOCKS = LIMITS["mem_blocks"][1]
MAX_TOKENS_LIMIT = LIMITS["max_tokens"][1]
MAX_UPLOAD = "512mb"  # what the server accepts; documents are then held to MAX_DOCUMENT_BYTES with a message
MAX_TRACE_BYTES = 512 * 1024**2
# Upload fields take any file: like the CLI, the reader decides by content (any UTF-8 text, a PDF's text layer,
# an HTML page's visible text) and refuses the rest with one message; a suffix filter in the browser refused
# .py or .rst files the CLI reads, with a toast that contradicted the status.
UPLOAD_LABEL = f"(any UTF-8 text, .pdf or .html; ≤ {MAX_DOCUMENT_BYTES // 1024**2} MB)"

ERROR_MARK = "**Error:**"


def error_status(message: str) -> str:
    """A status line that reports an error (the page repeats the part from ERROR_MARK beside the button)."""
    return f"{ERROR_MARK} {message}"


# After an error the plots stay, and so does the caption of the run they show, under this heading.
PLOTS_STILL_SHOW = "The plots still show:"


def keeping_caption(line: str, caption: str | None) -> str:
    """``line`` (e.g. an error status) with the caption of what the plots still show under it, so that they
    never lose what made them; only the first paragraph is repeated beside the button."""
    return f"{line}\n\n{PLOTS_STILL_SHOW} {caption}" if caption else line


# -- numbers -------------------------------------------------------------------------------------------------
def whole_number(label: str, value: object, low: int, high: int) -> int:
    """``value`` from a form field as an int in [low, high]; 2.5, inf, text or an empty field are refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FamvizError(f"{label} is empty; enter a whole number from {low} to {high:,}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FamvizError(f"{label} must be a whole number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number):
        raise FamvizError(f"{label} must be a whole number, got {value!r}.")
    if not low <= number <= high:
        raise FamvizError(f"{label} must be from {low} to {high:,}, got {int(number):,}.")
    return int(number)


def fraction(label: str, value: object) -> float:
    """A number from 0 to 1 (a depth in the document)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FamvizError(f"{label} must be a number from 0 to 1, got {value!r}.") from None
    if not 0 <= number <= 1:  # NaN fails this too
        raise FamvizError(f"{label} must be from 0 to 1, got {value}.")
    return number


def number_list(label: str, text: object, kind: type, low: float, high: float) -> list:
    """'200, 300; 400' -> the sorted distinct numbers, each in [low, high]."""
    try:
        values = [kind(part) for part in str(text).replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise FamvizError(f"{label} must be numbers separated by commas, got {text!r}.") from None
    if not values:
        raise FamvizError(f"{label} is empty.")
    if any(not low <= v <= high for v in values):
        raise FamvizError(f"{label} must lie between {low:g} and {high:,g}, got {text!r}.")
    return sorted(set(values))


def parse_settings(
    mode: str,
    block_size: float | str | None,
    fam_len: float | str | None,
    mem_blocks: float | str | None,
    max_tokens: float | str | None,
) -> tuple[FamConfig, int]:
    """The inspector run's FamConfig and token limit from the form, or a FamvizError with one clear message."""
    if mode not in MODES:
        raise FamvizError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if MODE_TABLE[mode].fam:
        fam_slots = whole_number("FAM length", fam_len, 1, MAX_FAM_LEN)
    else:  # unused outside fam mode: whatever is in the box must not stop a bswa/full run
        try:
            fam_slots = whole_number("FAM length", fam_len, 0, MAX_FAM_LEN)
        except FamvizError:
            fam_slots = DEFAULT_SETTINGS.fam_len
    config = FamConfig(
        mode=mode,
        block_size=whole_number("Block size", block_size, 1, MAX_BLOCK_SIZE),
        fam_len=fam_slots,
        mem_blocks=whole_number("Memory blocks", mem_blocks, 0, MAX_MEM_BLOCKS),
    )
    return config, whole_number("Max tokens", max_tokens, 1, MAX_TOKENS_LIMIT)


# -- documents -----------------------------------------------------------------------------------------------
class InputDocument(NamedTuple):
    text: str
    name: str
    read_cut: str | None = None  # only the start of a large file was read, e.g. "the first 0.5 MB of a 60.0 MB file"


def read_uploaded_document(
    upload: str | None,
    max_tokens: int | None,
    missing: str = "No file uploaded: choose a file, or pick pasted text or an example.",
) -> InputDocument:
    """The uploaded file's text (every tab reads uploads through here): of a plain-text file over the size
    limit only the start that ``max_tokens`` tokens can need; unreadable files give a DocumentError, no
    upload the tab's own ``missing`` message."""
    if not upload:
        raise DocumentError(missing)
    start, name = read_upload_start(upload, MAX_DOCUMENT_BYTES, head_bytes_for(max_tokens))
    return InputDocument(start.text, name, start.cut)


def document_cut(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    count_up_to: int = 2_000_000,
) -> str | None:
    """None when ``ids`` cover the whole document; else how much it holds: "of 7,658 tokens" (counted for
    documents up to ``count_up_to`` characters), or the share of its characters streamed for larger ones."""
    if not offsets or offsets[-1][1] >= len(text.rstrip()):
        return None
    if len(text) <= count_up_to:
        return f"of {len(tokenizer(text, add_special_tokens=False)['input_ids']):,} tokens"
    return f"{offsets[-1][1] / len(text):.0%} of its {len(text):,} characters"


def passkey_text(tokenizer: PreTrainedTokenizerBase, length: float | str | None) -> str:
    """The PassKey haystack example (key at the start: the memory must carry it to the question)."""
    from famviz.probes.passkey import make_passkey_document

    tokens = whole_number("PassKey length", length, 64, MAX_TOKENS_LIMIT)
    return make_passkey_document(tokenizer, tokens, depth=0.0, seed=0).text


def read_input_document(
    source: str,
    upload: str | None,
    pasted: str | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    passkey_tokens: float | str | None = DEFAULT_PASSKEY_TOKENS,
    max_tokens: int | None = None,
) -> InputDocument:
    """The inspector's chosen document, or a DocumentError/FamvizError saying what is wrong. An upload over
    the size limit is read only as far as ``max_tokens`` can need (plain text only)."""
    if source == "upload":
        return read_uploaded_document(upload, max_tokens)
    if source == "paste":
        if not pasted or not pasted.strip():
            raise FamvizError("No text pasted: paste some text, or pick a file or an example.")
        return InputDocument(pasted.replace("\r\n", "\n").replace("\r", "\n"), "pasted text")
    if source == "example":
        if not EXAMPLE_PATH.is_file():
            raise DocumentError(
                f"The example document {EXAMPLE_PATH} is not on this machine; upload a file or paste text instead."
            )
        return InputDocument(read_document(EXAMPLE_PATH, name=EXAMPLE_PATH.name), "GPL-3 licence")
    if source == "passkey":
        if tokenizer is None:
            raise FamvizError("The PassKey example needs the model's tokenizer.")
        return InputDocument(
            passkey_text(tokenizer, passkey_tokens), f"PassKey haystack ({int(float(passkey_tokens)):,} tokens)"
        )
    raise FamvizError(f"Unknown document source {source!r}; use one of {', '.join(SOURCES)}.")

"""Read a document as plain text for streaming through a model.

Supported:

- ``.txt``, ``.md``, ``.markdown``: the text as is, line endings normalised to ``\\n``.
- ``.pdf``: the PDF's text layer (via pypdf), pages separated by a blank line. Scanned PDFs
  without a text layer are refused with a hint to OCR them first.
- ``.html``, ``.htm``: the visible text (via BeautifulSoup); scripts, styles and the
  ``<head>`` are dropped, block elements become separate lines.
- Any other name (``.rst``, no suffix, ``LICENSE``...) is read as plain text. A file that
  starts like a PDF is read as a PDF whatever its name.

Text must be UTF-8 (a BOM is allowed) or UTF-16/UTF-32 with a BOM; nothing is guessed, so a
file in another encoding is reported with the byte offset of the first bad byte instead of
being silently misread. Every problem is raised as :class:`DocumentError` with a one-line
message meant for the user.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.errors import DocumentError

if TYPE_CHECKING:
    from pypdf import PdfReader

MAX_DOCUMENT_BYTES = 50 * 1024 * 1024
SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".pdf", ".html", ".htm")

_PDF_SUFFIXES = (".pdf",)
_HTML_SUFFIXES = (".html", ".htm")

# Binary sniffing looks at this much of the start, so huge files cost nothing extra.
_SNIFF_BYTES = 64 * 1024
# Share of control bytes above which a NUL-free sample is still called binary.
_MAX_CONTROL_SHARE = 0.10
# Control bytes that real text contains: tab, LF, VT, FF, CR, and ESC (ANSI colour in logs).
_TEXT_CONTROL_BYTES = b"\t\n\x0b\x0c\r\x1b"
_CONTROL_BYTES = bytes(b for b in range(32) if b not in _TEXT_CONTROL_BYTES) + b"\x7f"
_NON_CONTROL_BYTES = bytes(b for b in range(256) if b not in _CONTROL_BYTES)

_PDF_MAGIC = b"%PDF-"
# Common binary formats, named in the error so the user knows what they picked.
_KNOWN_BINARY_FORMATS = (
    (b"PK\x03\x04", "a ZIP archive (e.g. .docx, .odt, .epub)"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (e.g. .doc)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "an executable"),
)

# UTF-32 first: its little-endian BOM starts with the UTF-16 one.
_BOM_ENCODINGS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
)

# Elements whose text is never shown to a reader.
_HTML_INVISIBLE_TAGS = ("head", "title", "meta", "link", "script", "style", "noscript", "template")
# Elements that start a new line in a browser; inline ones (<b>, <a>...) stay within the line.
_HTML_BLOCK_TAGS = (
    "address",
    "article",
    "aside",
    "blockquote",
    "caption",
    "dd",
    "details",
    "div",
    "dl",
    "dt",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "td",
    "th",
    "tr",
    "ul",
)
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")

_MB = 1024 * 1024

# pypdf logs repair warnings ("EOF marker not found"...); without a handler Python prints them
# to stderr around our one-line error. Records still propagate to any handlers the app sets up.
logging.getLogger("pypdf").addHandler(logging.NullHandler())


def read_document(path: str | os.PathLike[str], max_bytes: int = MAX_DOCUMENT_BYTES, name: str | None = None) -> str:
    """Return the text of the document at ``path``; raise DocumentError if it can't be read.

    ``name`` names the file in messages (the app passes the upload's own name, never its server path);
    sizes in messages are the file's true size on disk.
    """
    path = Path(path)
    name = name or str(path)
    size = _regular_file_size(path, name)
    if size > max_bytes:
        raise _too_large(name, size, max_bytes)
    # One byte over the limit is enough to tell that it is too large (the file may have grown since stat,
    # and /proc-like files report size 0).
    data = _read_bytes(path, name, max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(name, max(size, len(data)), max_bytes)
    return read_document_bytes(data, name, max_bytes)


# Reading only the start of a text file for N tokens: no token of a real tokenizer is longer than this.
HEAD_BYTES_PER_TOKEN = 64


@dataclass
class DocumentStart:
    """The text of a document, or of the start of a large plain-text file (``read_bytes < file_bytes``)."""

    text: str
    read_bytes: int
    file_bytes: int

    @property
    def cut(self) -> str | None:
        """None for a whole document; else e.g. "the first 0.5 MB of a 60.0 MB file"."""
        if self.read_bytes >= self.file_bytes:
            return None
        return f"the first {_format_size(self.read_bytes)} of a {_format_size(self.file_bytes)} file"


def head_bytes_for(max_tokens: int | None) -> int | None:
    """How much of a plain-text file ``max_tokens`` tokens can need (None: all of it)."""
    return None if max_tokens is None else max(int(max_tokens), 1) * HEAD_BYTES_PER_TOKEN


def read_document_start(
    path: str | os.PathLike[str], head_bytes: int | None, max_bytes: int = MAX_DOCUMENT_BYTES, name: str | None = None
) -> DocumentStart:
    """Like ``read_document``, but a plain-text file over ``max_bytes`` is read only as far as ``head_bytes``
    (at most ``max_bytes``), so a file of any size can be streamed for a few tokens: the limit is on what is
    read, not on what is on disk. PDF and HTML files are always read whole, within ``max_bytes``."""
    path = Path(path)
    name = name or str(path)
    size = _regular_file_size(path, name)
    suffix = Path(name).suffix.lower()  # the upload's own name picks the format, like read_document_bytes
    if head_bytes is None or size <= max_bytes or suffix in _PDF_SUFFIXES + _HTML_SUFFIXES:
        if size > max_bytes and head_bytes is not None:  # PDF or HTML
            raise DocumentError(
                f"{name}: file is {_format_size(size)}, over the {_format_size(max_bytes)} limit; "
                f"PDF and HTML files are read whole: split it into smaller parts."
            )
        text = read_document(path, max_bytes, name)
        return DocumentStart(text, size, size)
    data = _read_bytes(path, name, min(head_bytes, max_bytes))
    if data.startswith(_PDF_MAGIC):
        raise DocumentError(
            f"{name}: a PDF is read whole, and this one is {_format_size(size)}, over the "
            f"{_format_size(max_bytes)} limit; split it into smaller parts."
        )
    text = _normalise_newlines(_decode_text(data, name, partial=True))
    if not text.strip():
        raise DocumentError(f"{name}: the first {_format_size(len(data))} contain only whitespace, no text.")
    return DocumentStart(text, len(data), size)


def read_upload_start(
    upload: str | os.PathLike[str] | None, max_bytes: int = MAX_DOCUMENT_BYTES, head_bytes: int | None = None
) -> tuple[DocumentStart, str]:
    """(start of the document, file name) of a file uploaded to the app: named by its own name, never by the
    server path it was stored under; with ``head_bytes``, only the start of a large plain-text file."""
    if not upload:
        raise DocumentError("No file uploaded: choose a file first.")
    path = Path(upload)
    return read_document_start(path, head_bytes, max_bytes, name=path.name), path.name


def _read_bytes(path: Path, name: str, count: int) -> bytes:
    """The first ``count`` bytes of the file, or a DocumentError saying why they cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(count)
    except PermissionError:
        raise DocumentError(f"{name}: permission denied; check the file's permissions.") from None
    except IsADirectoryError:
        raise DocumentError(f"{name}: is a directory, not a document; pass a file inside it.") from None
    except OSError as error:
        raise DocumentError(f"{name}: cannot read the file ({error.strerror or error}).") from None


def _regular_file_size(path: Path, name: str) -> int:
    """The size of the regular file at ``path``, or a DocumentError saying why it cannot be read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DocumentError(f"{name}: file not found; check the path.") from None
    except PermissionError:
        raise DocumentError(f"{name}: permission denied; check the file's permissions.") from None
    except OSError as error:
        raise DocumentError(f"{name}: cannot access the file ({error.strerror or error}).") from None
    except ValueError:  # e.g. a NUL character in the path
        raise DocumentError(f"{name!r}: not a valid file path.") from None
    if stat.S_ISDIR(info.st_mode):
        raise DocumentError(f"{name}: is a directory, not a document; pass a file inside it.")
    # Pipes and devices could block forever or never end; only regular files are read.
    if not stat.S_ISREG(info.st_mode):
        raise DocumentError(f"{name}: not a regular file; pass a text, Markdown, PDF or HTML file.")
    return info.st_size


def read_document_bytes(data: bytes, name: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """Return the text of a document given as bytes; ``name`` picks the format (by suffix)
    and names the document in error messages."""
    name = name or "document"
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > max_bytes:
        raise _too_large(name, len(data), max_bytes)
    if not data:
        raise DocumentError(f"{name}: file is empty (0 bytes).")

    suffix = Path(name).suffix.lower()
    if suffix in _PDF_SUFFIXES or (suffix not in _HTML_SUFFIXES and data.startswith(_PDF_MAGIC)):
        return _pdf_text(data, name)
    if suffix in _HTML_SUFFIXES:
        text = _html_text(data, name)
        if not text.strip():
            raise DocumentError(f"{name}: HTML page has no visible text.")
        return text
    text = _normalise_newlines(_decode_text(data, name))
    if not text.strip():
        raise DocumentError(f"{name}: file contains only whitespace, no text.")
    return text


def _too_large(name: str, size: int, max_bytes: int) -> DocumentError:
    size_text, limit_text = _format_size(size), _format_size(max_bytes)
    if size_text == limit_text:  # e.g. limit + 1 byte: rounding would hide the difference
        size_text, limit_text = f"{size:,} bytes", f"{max_bytes:,} bytes"
    return DocumentError(f"{name}: file is {size_text}, over the {limit_text} limit; split it into smaller parts.")


def _format_size(size: int) -> str:
    # MB for anything sizeable; tiny limits (tests, tight configs) would read as "0.0 MB".
    if size >= _MB // 10:
        return f"{size / _MB:.1f} MB"
    return f"{size:,} bytes"


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode_text(data: bytes, name: str, partial: bool = False) -> str:
    """Decode text by its BOM, else as UTF-8; refuse binary data before trying. ``partial``: ``data`` is
    the start of a file, so a character cut at its end is dropped, not an error."""
    for bom, encoding, label in _BOM_ENCODINGS:
        if data.startswith(bom):
            # UTF-16/32 text is full of NUL bytes, so binary sniffing only applies to UTF-8.
            if label == "UTF-8":
                _refuse_binary(data, name)
            return _decode_strict(data, len(bom), encoding, label, name, partial)
    _refuse_binary(data, name)
    return _decode_strict(data, 0, "utf-8", "UTF-8", name, partial)


class _NotDecodableError(DocumentError):
    """Text that is not binary but not valid in its encoding either."""


def _decode_strict(data: bytes, start: int, encoding: str, label: str, name: str, partial: bool = False) -> str:
    try:
        if partial:  # an incremental decoder keeps a cut character back instead of failing on it
            return codecs.getincrementaldecoder(encoding)("strict").decode(data[start:], final=False)
        return data[start:].decode(encoding)
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise _NotDecodableError(
            f"{name}: not valid {label} (byte 0x{data[offset]:02x} at byte offset {offset}, "
            f"line {line}); re-save the file as UTF-8."
        ) from None


def _refuse_binary(data: bytes, name: str) -> None:
    sample = data[:_SNIFF_BYTES]
    for magic, description in _KNOWN_BINARY_FORMATS:
        if sample.startswith(magic):
            raise DocumentError(
                f"{name}: binary file ({description}), not text; convert it to text, Markdown, PDF or HTML first."
            )
    control_count = len(sample.translate(None, _NON_CONTROL_BYTES))
    if b"\x00" in sample or control_count > _MAX_CONTROL_SHARE * len(sample):
        raise DocumentError(f"{name}: binary file, not text; supported are text, Markdown, PDF and HTML files.")


def _pdf_text(data: bytes, name: str) -> str:
    # Imported here so that text-only use doesn't pay for pypdf.
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _decrypt_without_password(reader):
            raise DocumentError(f"{name}: PDF is encrypted (password-protected); save an unprotected copy first.")
        page_count = len(reader.pages)
        page_texts = [(page.extract_text() or "").strip() for page in reader.pages]
    except DocumentError:
        raise
    except Exception as error:  # noqa: BLE001 - pypdf raises many types on damaged files; none may escape
        reason = str(error).splitlines()[0].strip() if str(error).strip() else type(error).__name__
        raise DocumentError(
            f"{name}: cannot read this PDF; it is corrupt, truncated or not a PDF ({reason})."
        ) from None
    if page_count == 0:
        raise DocumentError(f"{name}: PDF has no pages.")
    if not any(page_texts):
        raise DocumentError(
            f"{name}: PDF has no extractable text layer (probably scanned images); "
            f"run OCR on it first (e.g. ocrmypdf) and try again."
        )
    return _normalise_newlines("\n\n".join(text for text in page_texts if text))


def _decrypt_without_password(reader: PdfReader) -> bool:
    """Open PDFs that are encrypted only with an empty user password (view restrictions)."""
    try:
        return bool(reader.decrypt(""))
    except Exception:  # noqa: BLE001 - e.g. an AES PDF without the optional cryptography package
        return False


def _html_text(data: bytes, name: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_decode_html(data, name), "html.parser")
    for element in soup.find_all(_HTML_INVISIBLE_TAGS):
        element.decompose()
    for line_break in soup.find_all("br"):
        line_break.replace_with("\n")
    for block in soup.find_all(_HTML_BLOCK_TAGS):
        block.insert_before("\n")
        block.insert_after("\n")
    # Spaces and newlines in HTML source are layout, not text: collapse them per line.
    lines = (" ".join(line.split()) for line in soup.get_text().splitlines())
    return _BLANK_LINE_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def _decode_html(data: bytes, name: str) -> str:
    """Decode like plain text, but honour an explicit <meta charset> (legacy pages)."""
    try:
        return _decode_text(data, name)
    except _NotDecodableError as utf8_error:
        declared = _declared_html_charset(data)
        if not declared:
            raise
        try:
            return data.decode(declared)
        except (LookupError, UnicodeDecodeError):
            raise utf8_error from None


def _declared_html_charset(data: bytes) -> str | None:
    try:
        from bs4.dammit import EncodingDetector

        return EncodingDetector.find_declared_encoding(data, is_html=True, search_entire_document=False)
    except Exception:  # noqa: BLE001 - only a hint; a failure here just means "no declared charset"
        return None

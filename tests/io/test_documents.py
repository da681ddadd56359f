"""Tests for famviz.io.documents: every supported format and every user-facing error."""

from __future__ import annotations

import io
import logging
import os

import pytest
from helpers import make_pdf, text_stream

from famviz.errors import DocumentError, FamvizError
from famviz.io import documents
from famviz.io.documents import (
    MAX_DOCUMENT_BYTES,
    SUPPORTED_SUFFIXES,
    read_document,
    read_document_bytes,
)


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_message(call, *args, **kwargs) -> str:
    with pytest.raises(DocumentError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, "user-facing errors are one line"
    return message


# --- module constants ---------------------------------------------------------------------


def test_constants():
    assert MAX_DOCUMENT_BYTES == 50 * 1024 * 1024
    assert SUPPORTED_SUFFIXES == (".txt", ".md", ".markdown", ".pdf", ".html", ".htm")
    assert issubclass(DocumentError, FamvizError)


# --- plain text ---------------------------------------------------------------------------


def test_utf8_text(tmp_path):
    path = write(tmp_path, "notes.txt", "Grüße, 世界 — ok\n".encode())
    assert read_document(path) == "Grüße, 世界 — ok\n"


def test_accepts_str_path(tmp_path):
    path = write(tmp_path, "notes.md", b"# Title\n\nBody\n")
    assert read_document(str(path)) == "# Title\n\nBody\n"


def test_utf8_bom_is_stripped(tmp_path):
    path = write(tmp_path, "bom.txt", b"\xef\xbb\xbfhello")
    assert read_document(path) == "hello"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_with_bom(tmp_path, encoding):
    bom = {"utf-16": b"", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}[encoding]
    path = write(tmp_path, "wide.txt", bom + "héllo\r\nwörld".encode(encoding))
    assert read_document(path) == "héllo\nwörld"


def test_crlf_and_lone_cr_normalised(tmp_path):
    path = write(tmp_path, "dos.txt", b"one\r\ntwo\r\n\r\nthree\rfour")
    assert read_document(path) == "one\ntwo\n\nthree\nfour"


@pytest.mark.parametrize("name", ["README", "guide.rst", "LICENSE", "data.log", "x.MD"])
def test_other_names_read_as_text(tmp_path, name):
    path = write(tmp_path, name, b"plain words\n")
    assert read_document(path) == "plain words\n"


def test_tabs_and_ansi_colour_are_text(tmp_path):
    path = write(tmp_path, "build.log", b"\x1b[31merror\x1b[0m\tline\n" * 50)
    assert read_document(path).startswith("\x1b[31merror")


# --- errors: files ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = error_message(read_document, tmp_path / "nope.txt")
    assert "nope.txt" in message and "not found" in message


def test_directory(tmp_path):
    message = error_message(read_document, tmp_path)
    assert "directory" in message


def test_not_a_regular_file(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # Must answer at once instead of blocking on a pipe with no writer.
    assert "not a regular file" in error_message(read_document, fifo)


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, "secret.txt", b"hidden")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    # Simulated: tests often run as root, where chmod 000 does not stop reading.
    monkeypatch.setattr(documents, "open", deny, raising=False)
    message = error_message(read_document, path)
    assert "secret.txt" in message and "permission" in message.lower()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_real_permissions(tmp_path):
    path = write(tmp_path, "secret.txt", b"hidden")
    path.chmod(0)
    try:
        assert "permission" in error_message(read_document, path).lower()
    finally:
        path.chmod(0o600)


def test_empty_file(tmp_path):
    message = error_message(read_document, write(tmp_path, "empty.txt", b""))
    assert "empty.txt" in message and "empty" in message


def test_whitespace_only_file(tmp_path):
    message = error_message(read_document, write(tmp_path, "blank.md", b" \n\t\r\n  \n"))
    assert "whitespace" in message


def test_file_over_limit(tmp_path):
    path = write(tmp_path, "big.txt", b"a" * 101)
    message = error_message(read_document, path, max_bytes=100)
    assert "big.txt" in message and "limit" in message and "101" in message and "100" in message
    assert read_document(path, max_bytes=101) == "a" * 101


def test_the_start_of_a_file_over_the_limit_is_read_when_only_the_start_is_needed(tmp_path):
    from famviz.io.documents import read_document_start

    text = "héllo wörld " * 20  # 2-byte characters: a cut can fall inside one
    path = write(tmp_path, "big.txt", text.encode("utf-8"))
    size = path.stat().st_size
    whole = read_document_start(path, head_bytes=None, max_bytes=size)
    assert whole.text == text and whole.cut is None
    for head in range(20, 40):  # every cut position, inside a character or not: decoded up to the cut
        start = read_document_start(path, head_bytes=head, max_bytes=100)
        assert text.startswith(start.text) and len(start.text.encode("utf-8")) in (head, head - 1)
        assert start.cut == f"the first {head} bytes of a {size} bytes file"
    utf16 = write(tmp_path, "wide.txt", text.encode("utf-16"))  # with its BOM
    assert text.startswith(read_document_start(utf16, head_bytes=41, max_bytes=100).text)
    assert "limit" in error_message(read_document, path, max_bytes=100)  # the whole file is still refused
    for name, data in (("big.pdf", b"%PDF-1.4 " + b"x" * 200), ("page.html", b"<p>" + b"x" * 200)):
        message = error_message(read_document_start, write(tmp_path, name, data), head_bytes=64, max_bytes=100)
        assert name in message and "read whole" in message
    disguised = write(tmp_path, "paper.txt", b"%PDF-1.4 " + b"x" * 200)
    assert "PDF" in error_message(read_document_start, disguised, head_bytes=64, max_bytes=100)


def test_size_message_in_megabytes():
    megabyte = 1024 * 1024
    message = error_message(read_document_bytes, b"a" * (2 * megabyte), "big.txt", max_bytes=megabyte)
    assert "2.0 MB" in message and "1.0 MB limit" in message


def test_default_limit_is_stated_in_megabytes(tmp_path, monkeypatch):
    path = write(tmp_path, "huge.txt", b"a")
    real_stat = type(path).stat

    def stat_as_60_mb(self, *args, **kwargs):
        result = real_stat(self, *args, **kwargs)
        values = list(result)
        values[6] = 60 * 1024 * 1024  # st_size
        return os.stat_result(values)

    # The size check uses stat, so a huge file is refused without being read.
    monkeypatch.setattr(type(path), "stat", stat_as_60_mb)
    message = error_message(read_document, path)
    assert "60.0 MB" in message and "50.0 MB limit" in message


# --- errors: binary and encodings ---------------------------------------------------------


def test_binary_with_nul_bytes(tmp_path):
    path = write(tmp_path, "blob.txt", b"text\x00\x01\x02more text")
    message = error_message(read_document, path)
    assert "blob.txt" in message and "binary" in message


def test_binary_by_control_characters(tmp_path):
    path = write(tmp_path, "noise", bytes([1, 2, 3, 4, 5, 6, 7, 8]) * 10 + b"some words" * 20)
    assert "binary" in error_message(read_document, path)


def test_known_binary_format_is_named(tmp_path):
    path = write(tmp_path, "report.docx", b"PK\x03\x04" + b"\x14\x00\x06\x00" * 20)
    message = error_message(read_document, path)
    assert "binary" in message and "ZIP" in message


def test_invalid_utf8_reports_offset_without_latin1_fallback(tmp_path):
    data = "café\nnaïve".encode("latin-1")  # 0xe9 at byte 3
    message = error_message(read_document, write(tmp_path, "old.txt", data))
    assert "old.txt" in message and "not valid UTF-8" in message
    assert "offset 3" in message and "0xe9" in message and "line 1" in message


def test_invalid_utf8_offset_counts_the_bom(tmp_path):
    data = b"\xef\xbb\xbfok\nbad\xff"
    message = error_message(read_document, write(tmp_path, "bom.txt", data))
    assert "not valid UTF-8" in message and "offset 9" in message and "line 2" in message


def test_invalid_utf16(tmp_path):
    data = b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00\xd8"  # lone high surrogate
    message = error_message(read_document, write(tmp_path, "wide.txt", data))
    assert "not valid UTF-16" in message


# --- HTML ---------------------------------------------------------------------------------


HTML_PAGE = b"""<!DOCTYPE html>
<html><head><title>Page title</title><meta name="x" content="meta text">
<style>body { color: red; }</style><script>var hidden = 1;</script></head>
<body>
  <noscript>Enable JS</noscript><template><p>template text</p></template>
  <h1>Heading</h1>
  <p>First <b>bold</b> paragraph,
     same paragraph.</p>
  <!-- a comment -->


  <div>Second<br>line two</div>
  <ul><li>item one</li><li>item&nbsp;two</li></ul>
  <script>alert("no")</script>
</body></html>
"""


def test_html_visible_text_only(tmp_path):
    text = read_document(write(tmp_path, "page.html", HTML_PAGE))
    for hidden in (
        "Page title",
        "meta text",
        "color: red",
        "hidden",
        "Enable JS",
        "template text",
        "alert",
        "a comment",
        "DOCTYPE",
    ):
        assert hidden not in text
    assert "Heading" in text
    assert "First bold paragraph," in text  # inline tags stay on their line
    assert "Second\nline two" in text
    assert "item one" in text and "item two" in text
    assert "\n\n\n" not in text  # blank line runs collapsed
    assert text == text.strip()


def test_htm_suffix_and_crlf(tmp_path):
    text = read_document(write(tmp_path, "page.HTM", b"<p>one</p>\r\n<p>two</p>"))
    assert text == "one\n\ntwo"


def test_html_without_visible_text(tmp_path):
    path = write(tmp_path, "empty.html", b"<html><head><script>x()</script></head><body> </body></html>")
    assert "no visible text" in error_message(read_document, path)


def test_html_declared_legacy_charset(tmp_path):
    data = '<meta charset="windows-1252"><p>café</p>'.encode("cp1252")
    assert read_document(write(tmp_path, "legacy.html", data)) == "café"


def test_html_undeclared_legacy_charset_is_refused(tmp_path):
    data = "<p>café</p>".encode("cp1252")
    assert "not valid UTF-8" in error_message(read_document, write(tmp_path, "legacy.html", data))


# --- PDF ----------------------------------------------------------------------------------


def test_pdf_text_layer(tmp_path, caplog):
    path = write(tmp_path, "hello.pdf", make_pdf(text_stream("Hello famviz")))
    with caplog.at_level(logging.WARNING, logger="pypdf"):
        assert read_document(path).strip() == "Hello famviz"
    assert not caplog.records, "the hand-written PDF should parse cleanly (correct xref)"


def test_pdf_pages_joined_by_blank_line(tmp_path):
    path = write(tmp_path, "two.PDF", make_pdf(text_stream("Page one"), text_stream("Page two")))
    assert read_document(path) == "Page one\n\nPage two"


def test_pdf_without_text_layer(tmp_path):
    path = write(tmp_path, "scan.pdf", make_pdf(b""))
    message = error_message(read_document, path)
    assert "scan.pdf" in message and "no extractable text layer" in message and "OCR" in message


def test_garbage_named_pdf(tmp_path):
    path = write(tmp_path, "broken.pdf", b"this is not a pdf at all \x00\xff" * 10)
    message = error_message(read_document, path)
    assert "broken.pdf" in message and "corrupt" in message
    assert "binary" not in message


def test_truncated_pdfs_never_leak_library_errors(tmp_path):
    pdf = make_pdf(text_stream("Hello famviz"))
    for cut in range(1, len(pdf), 7):
        try:
            read_document_bytes(pdf[:cut], "cut.pdf")
        except DocumentError:
            pass  # any other exception type fails the test


def test_pdf_with_other_name_is_not_called_binary(tmp_path):
    path = write(tmp_path, "download", make_pdf(text_stream("Sniffed")))
    assert read_document(path).strip() == "Sniffed"


def _encrypted_pdf(user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(text_stream("Locked text")))))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def test_password_protected_pdf():
    message = error_message(read_document_bytes, _encrypted_pdf("secret"), "locked.pdf")
    assert "locked.pdf" in message and "encrypted" in message and "password" in message


def test_pdf_encrypted_with_empty_user_password_is_read():
    assert read_document_bytes(_encrypted_pdf(""), "restricted.pdf").strip() == "Locked text"


# --- in-memory uploads --------------------------------------------------------------------


def test_read_document_bytes_matches_files(tmp_path):
    for name, data in [("a.txt", b"x\r\ny"), ("a.html", HTML_PAGE), ("a.pdf", make_pdf(text_stream("Hello famviz")))]:
        assert read_document_bytes(data, name) == read_document(write(tmp_path, name, data))


def test_read_document_bytes_errors_name_the_upload():
    message = error_message(read_document_bytes, b"", "upload.txt")
    assert "upload.txt" in message and "empty" in message
    assert "over the 4 bytes limit" in error_message(read_document_bytes, b"hello", "u.txt", max_bytes=4)
    assert "binary" in error_message(read_document_bytes, bytearray(b"\x00\x00ab"), "u.bin")


def test_read_document_calls_the_bytes_path(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        documents, "read_document_bytes", lambda data, name, max_bytes: seen.append((data, name, max_bytes)) or "ok"
    )
    path = write(tmp_path, "n.txt", b"abc")
    assert read_document(path, max_bytes=10) == "ok"
    assert seen == [(b"abc", str(path), 10)]


def test_uploads_report_their_true_size_and_name_in_both_tabs(tmp_path):
    """One reader for uploads (inspector and PassKey tab): the file's real size, its name, no server path."""
    from famviz.app.inputs import read_uploaded_document

    big = tmp_path / "server" / "uploads" / "big.txt"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as handle:
        handle.truncate(62_915_028)  # 60 MB of zero bytes: sparse, nothing is written
    message = error_message(read_uploaded_document, big, None)
    assert message.startswith("big.txt: file is 60.0 MB, over the 50.0 MB limit")
    assert str(big.parent) not in message
    with pytest.raises(DocumentError) as caught:  # the PassKey tab reads the start it needs: zero bytes
        read_uploaded_document(str(big), 100)
    assert str(caught.value).startswith("big.txt: binary file") and str(big.parent) not in str(caught.value)
    assert "No file uploaded" in error_message(read_uploaded_document, None, None)

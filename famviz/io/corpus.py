"""A researcher's own training text: documents read one at a time, never the whole corpus at once.

A corpus is one or more paths, each of them
- a directory of documents (.txt, .md, .pdf, .html, read with ``famviz.io.documents``), searched recursively,
  or one such document;
- a ``.jsonl`` file whose lines are objects with a ``text`` field (its line offsets are indexed in one
  streaming pass; a line is read when drawn);
- a Hugging Face dataset: ``.parquet`` / ``.arrow`` files (or a directory of them), or a directory written
  by ``datasets.save_to_disk``; read with the ``datasets`` library, memory-mapped, with a ``text`` column.

Every document has a stable id (``root/relative path``, or ``file:record`` counting non-blank lines, or
``dataset:row``). A fixed ~1% of them, chosen by a hash of the id, is held out from training for the
long-document evaluation (at least one when the corpus has two or more documents), so the split is the same
in every run and on every machine, as long as the corpus is given the same way (ids are relative to each
path given: a subfolder given alone names its documents differently).
"""

from __future__ import annotations

import json
import zlib
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from famviz.errors import ConfigError, DocumentError
from famviz.io.documents import SUPPORTED_SUFFIXES

if TYPE_CHECKING:
    from collections.abc import Iterable

TEXT_FIELD = "text"
HELD_OUT_PER_MILLE = 10
DATASET_SUFFIXES = (".parquet", ".arrow")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
MAX_DOCUMENT_CHARS = 2_000_000  # windows come from a document's first 2M characters (~500k tokens)
HELD_OUT_RULE = f"crc32(document id) % 1000 < {HELD_OUT_PER_MILLE}"


def is_held_out(document_id: str) -> bool:
    return zlib.crc32(document_id.encode("utf-8")) % 1000 < HELD_OUT_PER_MILLE


class _Documents:
    """Files of a directory (or one file), read with the project's document readers."""

    def __init__(self, root: Path):
        self.root = root
        if root.is_file():
            self.paths = [root]
        else:
            self.paths = sorted(
                p
                for p in root.rglob("*")
                if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file() and not p.is_symlink()
            )
        if not self.paths:
            raise ConfigError(f"corpus {root} holds no documents ({', '.join(SUPPORTED_SUFFIXES)})")
        self.count = len(self.paths)

    def doc_id(self, index: int) -> str:
        path = self.paths[index]
        return f"{self.root.name}/{path.relative_to(self.root)}" if self.root.is_dir() else path.name

    def text(self, index: int) -> str:
        from famviz.io.documents import read_document_start

        return read_document_start(self.paths[index], MAX_DOCUMENT_CHARS * 4).text[:MAX_DOCUMENT_CHARS]


class _JsonLines:
    """A .jsonl file: the byte offset of every non-blank line, found in one pass; a line is parsed when read."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets = array("q")  # 8 bytes per line: a corpus of millions of lines stays small in memory
        with open(path, "rb") as handle:
            offset = 0
            for line in handle:
                if line.strip():
                    self.offsets.append(offset)
                offset += len(line)
        if not len(self.offsets):
            raise ConfigError(f"corpus {path} is empty")
        first = self._record(0)
        if not isinstance(first, dict) or TEXT_FIELD not in first:
            raise ConfigError(
                f"corpus {path}: its lines must be JSON objects with a {TEXT_FIELD!r} field "
                f"(the first one has {sorted(first) if isinstance(first, dict) else type(first).__name__})"
            )
        self.count = len(self.offsets)

    def doc_id(self, index: int) -> str:
        return f"{self.path.name}:{index + 1}"

    def _record(self, index: int):
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[index])
            line = handle.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DocumentError(
                f"record {index + 1} of {self.path.name} is not JSON ({exc.__class__.__name__})"
            ) from None

    def text(self, index: int) -> str:
        record = self._record(index)
        value = record.get(TEXT_FIELD) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DocumentError(f"record {index + 1} of {self.path.name} has no {TEXT_FIELD!r} string")
        return value[:MAX_DOCUMENT_CHARS]


class _HuggingFaceDataset:
    """Parquet/arrow files or a ``save_to_disk`` directory, through ``datasets`` (memory-mapped)."""

    def __init__(self, path: Path):
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                "reading a Hugging Face dataset needs the datasets package: pip install datasets"
            ) from None
        datasets.disable_progress_bars()
        try:
            if path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_FILES):
                data = datasets.load_from_disk(str(path))
                if isinstance(data, datasets.DatasetDict):
                    data = data["train"] if "train" in data else data[next(iter(data))]
            else:
                files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATASET_SUFFIXES)
                builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
                data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable dataset is one message
            raise ConfigError(f"corpus {path} is not a readable dataset ({type(exc).__name__}: {exc})") from None
        if TEXT_FIELD not in data.column_names:
            raise ConfigError(f"corpus {path} has no {TEXT_FIELD!r} column (columns: {', '.join(data.column_names)})")
        if len(data) == 0:
            raise ConfigError(f"corpus {path} is empty")
        self.data = data.select_columns([TEXT_FIELD])
        self.name = path.name
        self.count = len(data)

    def doc_id(self, index: int) -> str:
        return f"{self.name}:{index}"

    def text(self, index: int) -> str:
        value = self.data[index][TEXT_FIELD]
        if not isinstance(value, str):
            raise DocumentError(f"row {index} has no {TEXT_FIELD!r} string")
        return value[:MAX_DOCUMENT_CHARS]


def _open_source(path: Path):
    if not path.exists():
        raise ConfigError(f"corpus path {path} does not exist")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _JsonLines(path)
        if path.suffix in DATASET_SUFFIXES:
            return _HuggingFaceDataset(path)
        if path.suffix.lower() in SUPPORTED_SUFFIXES:
            return _Documents(path)
        raise ConfigError(
            f"corpus file {path} is not a document ({', '.join(SUPPORTED_SUFFIXES)}), a .jsonl file "
            f"or a dataset ({', '.join(DATASET_SUFFIXES)})"
        )
    # A dataset snapshot keeps its data files in subfolders (data/train-*.parquet) beside a README.md: any
    # parquet/arrow file makes the folder a dataset, not a folder of documents.
    if any((path / name).exists() for name in SAVED_DATASET_FILES) or any(
        p.suffix in DATASET_SUFFIXES for p in path.rglob("*")
    ):
        return _HuggingFaceDataset(path)
    return _Documents(path)


class Corpus:
    """Documents of one or more paths, split once into training and held-out documents (``is_held_out``).

    A document is addressed by its index over all paths (``training`` and ``held_out`` are index arrays,
    8 bytes a document); ``text(index)`` reads it and ``doc_id(index)`` names it. Unreadable documents
    raise DocumentError (``TextCorpus`` skips and counts them).
    """

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p).expanduser().resolve() for p in paths]  # as the card records them
        if not self.paths:
            raise ConfigError("no corpus path given")
        self.sources = [_open_source(p) for p in self.paths]
        self._starts = np.cumsum([0] + [source.count for source in self.sources])
        held = np.fromiter((is_held_out(self.doc_id(i)) for i in range(len(self))), dtype=bool, count=len(self))
        if not held.any() and len(self) > 1:
            held[-1] = True  # too few documents for 1%: the last one is held out
        self.training = np.flatnonzero(~held)
        self.held_out = np.flatnonzero(held)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int):
        source = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[source], int(index - self._starts[source])

    def doc_id(self, index: int) -> str:
        source, local = self._locate(index)
        return source.doc_id(local)

    def text(self, index: int) -> str:
        source, local = self._locate(index)
        return source.text(local)

    def describe(self) -> dict:
        """What the training card records: the paths, counts and the held-out ids (the split's rule too)."""
        return {
            "paths": [str(p) for p in self.paths],
            "documents": len(self),
            "training_documents": len(self.training),
            "held_out_rule": HELD_OUT_RULE,
            "held_out": [self.doc_id(int(i)) for i in self.held_out[:50]],
            "held_out_documents": len(self.held_out),
        }

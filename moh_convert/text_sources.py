"""Text for calibration and training, as documents: local .txt / .jsonl files and Hugging Face datasets.

Both `moh calibrate` (which needs a few thousand tokens at once) and `moh train` (which streams and packs tokens)
read text through these functions, so a file or dataset reads the same way in either, with the same errors.
A source yields pieces `(text, ends_document)`: a .txt file is one document read in pieces of about
TEXT_CHUNK_CHARS cut at line ends, each JSONL record and each dataset row is a document.
"""
import json
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MoHError

TEXT_CHUNK_CHARS = 1 << 16
TEXT_SUFFIXES = (".txt", ".jsonl")
DOCUMENT_SEPARATOR = "\n\n"  # between documents when a source is read as one text


def file_pieces(path: Path, column: str, column_option: str) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of one local file. `column_option` names the option that sets the JSONL key,
    for the error message."""
    if path.suffix == ".jsonl":
        with open(path) as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[column], True
                except (ValueError, KeyError, TypeError):
                    raise MoHError(
                        f"{path}:{line_number} is not a JSON object with a {column!r} field (set {column_option})"
                    ) from None
        return
    with open(path) as handle:
        piece: list[str] = []
        size = 0
        for line in handle:
            piece.append(line)
            size += len(line)
            if size >= TEXT_CHUNK_CHARS:
                yield "".join(piece), False
                piece, size = [], 0
        yield "".join(piece), True


def open_dataset(name: str, config: str | None, split: str, streaming: bool = True):
    """A Hugging Face dataset split (through the local cache when offline)."""
    import datasets

    return datasets.load_dataset(name, config, split=split, streaming=streaming)


def dataset_pieces(rows: Iterable[dict], name: str, column: str, column_option: str) -> Iterator[tuple[str, bool]]:
    """(text, True) for each row of a dataset; a missing column is a MoHError listing the columns there are."""
    for row in rows:
        if column not in row:
            raise MoHError(
                f"dataset {name!r} has no column {column!r} (columns: {', '.join(row)}); set {column_option}"
            )
        yield row[column], True


def join_documents(pieces: Iterable[tuple[str, bool]], max_chars: int | None = None) -> str:
    """The documents of `pieces` as one text, separated by DOCUMENT_SEPARATOR; reading stops at the end of the
    first document that brings the text to `max_chars` (None: read everything)."""
    documents, current, length = [], [], 0
    for text, ends_document in pieces:
        current.append(text)
        length += len(text)
        if ends_document:
            documents.append("".join(current))
            current = []
            if max_chars is not None and length >= max_chars:
                break
    if current:
        documents.append("".join(current))
    return DOCUMENT_SEPARATOR.join(documents)

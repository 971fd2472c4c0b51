"""Text for calibration and training, as documents: local .txt / .jsonl files and Hugging Face datasets.

Both `moh calibrate` (which needs a few thousand tokens at once) and `moh train` (which streams and packs tokens)
read text through these functions, so a file or dataset reads the same way in either, with the same errors.
A source yields pieces `(text, ends_document)`: a .txt file is one document read in pieces of about
TEXT_CHUNK_CHARS cut at line ends, each JSONL record and each dataset row is a document.
"""
import codecs
import json
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MoHError

TEXT_CHUNK_CHARS = 1 << 16
TEXT_SUFFIXES = (".txt", ".jsonl")
DOCUMENT_SEPARATOR = "\n\n"  # between documents when a source is read as one text


def file_pieces(path: Path, column: str, column_option: str) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of one local file, read as UTF-8 (a leading byte-order mark is dropped).
    `column_option` names the option that sets the JSONL key, for the error message. Text that is not UTF-8 and
    a file that cannot be read are MoHErrors saying so."""
    try:
        yield from _file_pieces(path, column, column_option)
    except UnicodeDecodeError:
        raise MoHError(
            f"{path} is not UTF-8 text (invalid byte at position {first_invalid_utf8_byte(path)}); convert it to "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    except OSError as error:
        raise MoHError(f"cannot read {path}: {error.strerror or error}") from None


def _file_pieces(path: Path, column: str, column_option: str) -> Iterator[tuple[str, bool]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[column]
                except (ValueError, KeyError, TypeError, IndexError):
                    raise MoHError(
                        f"{path}:{line_number} is not a JSON object with a {column!r} field (set {column_option})"
                    ) from None
                if not isinstance(text, str):
                    raise MoHError(f"{path}:{line_number}: the {column!r} field is a {type(text).__name__}, not text "
                                   f"(set {column_option})")
                yield text, True
        return
    with open(path, encoding="utf-8-sig") as handle:
        piece: list[str] = []
        size = 0
        for line in handle:
            piece.append(line)
            size += len(line)
            if size >= TEXT_CHUNK_CHARS:
                yield "".join(piece), False
                piece, size = [], 0
        yield "".join(piece), True


def first_invalid_utf8_byte(path: Path) -> int | None:
    """Byte offset of the first byte of `path` that is not valid UTF-8 (None: all of it is)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes handed to the decoder before this chunk
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])  # the undecoded end of the previous chunk is decoded with this one
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return offset - pending + error.start
            if not chunk:
                return None
            offset += len(chunk)


def check_text_file(path: Path, column: str, column_option: str) -> bool:
    """Read all of a local file as `file_pieces` reads it, so that text that is not UTF-8 or a bad JSONL line is a
    MoHError now, before any long work. Returns whether the file holds any text (not only white space)."""
    has_text = False
    for text, _ in file_pieces(path, column, column_option):
        has_text = has_text or bool(text.strip())
    return has_text


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

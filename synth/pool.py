"""Candidate pools: the sentences a session may show, read from a text or CSV corpus file.

Runs in the controller process and in the simulated subject's process. A text file has one
sentence per line (``#`` starts a comment line), and a CSV file has a header row and a sentence
column. Sentences are NFC-normalised, whitespace is collapsed, and repeats are dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import unicodedata
from dataclasses import dataclass
from pathlib import Path


class PoolFileError(ValueError):
    """A corpus file that cannot be read as a candidate pool."""


@dataclass(frozen=True)
class CandidatePool:
    """Sentences with stable ids (``s`` + the first 10 hex digits of their SHA-1)."""

    texts: list[str]
    ids: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def stimulus_id(text: str) -> str:
    """Return the stable id of a sentence."""
    return "s" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def clean_text(text: str) -> str:
    """Return ``text`` in Unicode NFC with runs of whitespace collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise PoolFileError(
            f"{path}: not valid UTF-8 at byte {err.start} (line {line}: "
            f"{raw[err.start:err.start + 8]!r}); convert the file to UTF-8."
        ) from err


def load_pool_file(path: Path, column: str = "sentence", n_words: int | None = None) -> CandidatePool:
    """Read a corpus file; with ``n_words``, keep only sentences of exactly that many words."""
    path = Path(path)
    if not path.is_file():
        raise PoolFileError(f"{path}: pool file not found.")
    content = _decode(path)
    if path.suffix.lower() in {".csv", ".tsv"}:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        reader = csv.DictReader(io.StringIO(content), dialect=dialect)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise PoolFileError(
                f"{path}: no column {column!r} in the header {reader.fieldnames}; set pool.column "
                "to the column that holds the sentences."
            )
        raw = [row[column] or "" for row in reader]
    else:
        raw = [line for line in content.splitlines() if not line.lstrip().startswith("#")]

    texts, seen = [], set()
    for line in raw:
        text = clean_text(line)
        if not text or text.casefold() in seen:
            continue
        if n_words is not None and len(text.split()) != n_words:
            continue
        seen.add(text.casefold())
        texts.append(text)
    if len(texts) < 10:
        raise PoolFileError(
            f"{path}: only {len(texts)} usable sentences"
            + (f" of {n_words} words" if n_words else "")
            + "; a pool needs at least 10."
        )
    return CandidatePool(texts, [stimulus_id(text) for text in texts], str(path))

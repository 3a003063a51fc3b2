"""``metadata.csv`` as the review page changes it.

Each record keeps the exact text it was read from, so a save rewrites the rows it changes and
leaves every other one byte for byte and in order (blank lines, quoting, a byte-order mark and
CRLF line ends included); rows for images without one are appended, as ``make seed-edits``
appends them. The result is parsed with the merge stage's own reader before it is written, so
the page can never save a table the workflow would refuse.

A save names the version it started from (the sha256 of the bytes the page read): when the file
changed on disk since, it is refused and nothing is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from loramill import LoramillError
from loramill.captions.edits import COLUMNS, decode, parse_metadata, row_key
from loramill.files import atomic_path

ABSENT = "absent"  # the version of a dataset without a metadata.csv
BOM = "\ufeff"


@dataclass(frozen=True)
class Change:
    """What the page sets for one image: its edit (``prompt`` and ``mode``), or no edit."""

    name: str  # the image's name as an edit row gives it (loramill.captions.seed_edits)
    prompt: str | None  # None: remove the image's row (it trains on its auto caption)
    mode: str = "replace"
    image_sha256: str = ""


class Conflict(LoramillError):
    """The file changed on disk since the page read it."""


def version(data: bytes | None) -> str:
    return ABSENT if data is None else hashlib.sha256(data).hexdigest()


def _records(text: str) -> Iterator[tuple[str, list[str]]]:
    """(raw text, fields) of each CSV record, the raw text exactly as in ``text``: csv reads
    lines one at a time, so the lines it took for a record are that record's text. The lines
    are the merge stage's (io.StringIO with newline=""): str.splitlines would also split at
    characters such as U+2028 that csv keeps inside a field."""
    lines = iter(io.StringIO(text, newline=""))
    taken: list[str] = []

    def feed() -> Iterator[str]:
        for line in lines:
            taken.append(line)
            yield line

    for fields in csv.reader(feed(), strict=True):
        yield "".join(taken), fields
        taken.clear()


class Table:
    """A dataset's ``metadata.csv`` (or its absence), as read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes() if path.is_file() else None
        text = "" if self.data is None else decode(path)
        if self.data is not None and self.data.removeprefix(BOM.encode()) != text.encode("utf-8"):
            # the version is the first read's and the rows the second's: they must agree
            raise Conflict(f"{path} changed while it was read; reload")
        # its edits, as the merge stage reads them (a file it refuses: its line, not a crash)
        self.edits = {} if self.data is None else parse_metadata(text, path, path.parent)
        self.bom = BOM if self.data is not None and self.data.startswith(BOM.encode()) else ""
        self.newline = "\r\n" if "\r\n" in text else "\n"
        records = list(_records(text))
        self.header = [c.strip() for c in records[0][1]] if records else list(COLUMNS)
        self.head = records[0][0] if records else ""
        self.rows = records[1:]

    @property
    def version(self) -> str:
        return version(self.data)

    def _serialized(self, change: Change) -> str:
        values = {"filename": change.name, "prompt": change.prompt, "mode": change.mode,
                  "image_sha256": change.image_sha256}  # fmt: skip
        if change.mode != "replace" and "mode" not in self.header:
            raise LoramillError(
                f"{self.path}: no mode column, so {change.name} cannot {change.mode}; add "
                "',mode' to the header line (the rows may leave it empty: replace)"
            )
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=self.newline).writerow(
            [values.get(column, "") for column in self.header]
        )
        return buffer.getvalue()

    def changed(self, changes: list[Change]) -> str:
        """The file's text with ``changes`` made (each at its row, or appended), less a
        byte-order mark (:meth:`save` writes it back)."""
        pending = {row_key(c.name): c for c in changes}
        out = [self.head or self._header_line()]
        for raw, fields in self.rows:
            named = dict(zip(self.header, fields, strict=False)).get("filename", "").strip()
            change = pending.pop(row_key(named), None)
            if change is None:
                out.append(raw)
            elif change.prompt is not None:  # the row keeps its filename as the user wrote it
                out.append(self._serialized(replace(change, name=named)))
        added = [self._serialized(c) for c in pending.values() if c.prompt is not None]
        if added and not out[-1].endswith(("\n", "\r")):
            out[-1] += self.newline
        return "".join(out + added)

    def _header_line(self) -> str:
        return ",".join(self.header) + self.newline

    def save(self, started_from: str, changes: list[Change]) -> str:
        """Write the file with ``changes`` made; its new version. Refused (Conflict) when the
        file on disk is no longer the version ``started_from``; refused (LoramillError) when
        the merge stage would refuse the result (a bad mode, an empty prompt: its message names
        the row)."""
        if self.version != started_from:
            raise Conflict(f"{self.path} changed on disk since the page read it")
        text = self.changed(changes)
        parse_metadata(text, self.path, self.path.parent)  # what the merge stage will read
        data = (self.bom + text).encode("utf-8")
        write_in_place_or_atomically(self.path, data)
        return version(data)


def write_in_place_or_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (loramill.files.atomic_path), keeping its permissions; where
    the folder may not be written (a dataset kept read-only but for this file), overwrite the
    file itself: nothing else in the folder is ever created. Never through a link: that would
    change the file it points to (DVC's cache) too."""
    mode = path.stat().st_mode & 0o7777 if path.is_file() else None
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except PermissionError:
        _overwrite(path, data)
        return
    if mode is not None:
        os.chmod(path, mode)


def _overwrite(path: Path, data: bytes) -> None:
    if not path.is_file():
        raise LoramillError(f"{path.parent}: not writable, and {path.name} does not exist")
    if path.is_symlink() or path.stat().st_nlink > 1:
        raise LoramillError(
            f"{path}: a link (into DVC's cache?) in a folder that is not writable; writing "
            "through it would change the file it points to: make the folder writable"
        )
    try:
        with open(path, "r+b") as target:
            target.write(data)
            target.truncate()
    except OSError as error:
        raise LoramillError(f"{path}: not written ({error.strerror})") from None

"""Human caption edits: where people write them, read strictly, matched to images by name.

Two places, both only ever read by the workflow:

- ``data/<ds>/metadata.csv`` — the lora-scripts format, reviewed and diffed in git: a header
  ``filename,prompt``, optionally ``mode`` (``replace | prepend | append | exclude``; empty
  means replace) and ``image_sha256`` (the image's content when the row was written, so an
  edit of a since-changed image is reported as stale);
- kohya-style sidecars in ``data/<ds>/captions/``: ``<stem>.txt`` or ``<stem>.caption``
  (``photo.jpg.txt`` too), one caption on one line, mode replace.

Names match after Unicode NFC normalisation and case-folding, with or without the image's
extension. One image edited in both places is an error naming both. Any malformed input is
one error naming the file and line; nothing is ever rewritten.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loramill import LoramillError
from loramill.dataset_files import entries, match_key

COLUMNS = ("filename", "prompt", "mode", "image_sha256")
REQUIRED = ("filename", "prompt")
MODES = ("replace", "prepend", "append", "exclude")


@dataclass(frozen=True)
class Edit:
    text: str
    mode: str  # one of MODES
    image_sha256: str  # "" when not recorded
    origin: str  # "metadata.csv:12" or "captions/photo.txt", for messages


def decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig: Excel's "CSV UTF-8" (and Notepad) start the file with a byte-order mark
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise LoramillError(f"{path}:{line}: not UTF-8 text") from None


def _header(path: Path, header: list[str]) -> list[str]:
    unknown = [column for column in header if column not in COLUMNS]
    missing = [column for column in REQUIRED if column not in header]
    if unknown or missing or len(set(header)) != len(header):
        problem = f"missing column '{missing[0]}'" if missing else "a repeated column"
        problem = f"unknown column '{unknown[0]}'" if unknown else problem
        raise LoramillError(
            f"{path}:1: {problem}; the header is {','.join(COLUMNS[:2])}[,mode][,image_sha256]"
        )
    return header


def row_key(filename: str) -> str:
    """The ``match_key`` of the image a metadata.csv row names (``images/a.png`` or ``a``)."""
    return match_key(PurePosixPath(filename.strip().replace("\\", "/")).name)


def _row(path: Path, line: int, values: dict[str, str], dataset_root: Path) -> tuple[str, Edit]:
    name, mode = values["filename"].strip(), (values.get("mode") or "").strip() or "replace"
    if not name:
        raise LoramillError(f"{path}:{line}: empty filename")
    pure = PurePosixPath(name.replace("\\", "/"))
    if (
        pure.is_absolute()
        or ".." in pure.parts
        or len(pure.parts) > 2
        or (len(pure.parts) == 2 and pure.parts[0] != "images")
    ):
        raise LoramillError(f"{path}:{line}: '{name}' is not an image of this dataset")
    if mode not in MODES:
        raise LoramillError(f"{path}:{line}: mode '{mode}'; use one of {', '.join(MODES)}")
    text = " ".join(values["prompt"].split())
    if not text and mode != "exclude":
        raise LoramillError(f"{path}:{line}: empty prompt (mode exclude drops an image)")
    sha = (values.get("image_sha256") or "").strip().lower()
    origin = f"{os.path.relpath(path, dataset_root)}:{line}"
    return row_key(name), Edit(text, mode, sha, origin)


def read_metadata(path: Path, dataset_root: Path) -> dict[str, Edit]:
    """The edits of a ``metadata.csv``; a missing file means none."""
    if not path.is_file():
        return {}
    return parse_metadata(decode(path), path, dataset_root)


def parse_metadata(text: str, path: Path, dataset_root: Path) -> dict[str, Edit]:
    """The edits of ``text``, a ``metadata.csv`` at ``path`` (what errors name)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    edits: dict[str, Edit] = {}
    try:
        header = _header(path, [c.strip() for c in next(reader, [])])
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise LoramillError(
                    f"{path}:{line}: {len(row)} fields, the header has {len(header)}"
                )
            key, edit = _row(path, line, dict(zip(header, row, strict=True)), dataset_root)
            if key in edits:
                raise LoramillError(
                    f"{path}:{line}: a second row for the image of {edits[key].origin}"
                )
            edits[key] = edit
    except csv.Error as error:
        raise LoramillError(f"{path}:{reader.line_num}: {error}") from None
    return edits


def read_sidecar(path: Path) -> str:
    """The caption in a sidecar file; errors name the file (and line)."""
    text = decode(path)
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise LoramillError(f"{path}: empty caption (delete the file to use the auto caption)")
    if len(lines) > 1:
        raise LoramillError(f"{path}:{lines[1][0]}: a caption file holds one caption on one line")
    return " ".join(lines[0][1].split())


def read_sidecars(folder: Path, dataset_root: Path) -> dict[str, Edit]:
    edits: dict[str, Edit] = {}
    for entry in entries(folder, "captions"):
        path = Path(entry.path)
        key = match_key(os.path.splitext(entry.name)[0])
        origin = os.path.relpath(path, dataset_root)
        if key in edits:
            raise LoramillError(f"{origin} and {edits[key].origin}: two edits for one image")
        edits[key] = Edit(read_sidecar(path), "replace", "", origin)
    return edits


def read_edits(
    metadata_csv: str | os.PathLike | None, captions_dir: str | os.PathLike | None
) -> dict[str, Edit]:
    """Every edit of a dataset, by ``match_key`` of its image; missing places hold none."""
    table = {}
    if metadata_csv is not None:
        table = read_metadata(Path(metadata_csv), Path(metadata_csv).parent)
    return with_sidecars(table, captions_dir)


def with_sidecars(
    table: dict[str, Edit], captions_dir: str | os.PathLike | None
) -> dict[str, Edit]:
    """A metadata.csv's edits and the sidecars' of ``captions_dir``; one image in both is an
    error."""
    sidecars = {}
    if captions_dir is not None and Path(captions_dir).is_dir():
        sidecars = read_sidecars(Path(captions_dir), Path(captions_dir).parent)
    both = sorted(set(table) & set(sidecars))
    if both:
        first = both[0]
        raise LoramillError(
            f"{table[first].origin} and {sidecars[first].origin}: two edits for one image; keep one"
        )
    return {**table, **sidecars}

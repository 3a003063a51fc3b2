"""Which files of a dataset folder the stages read, and their content hashes.

One answer serves both the stages (resize lists its images here, merge its caption edits) and
the rerun decision (a stage's fingerprint covers exactly these files), so a ``.DS_Store`` the
stages never read cannot retrain anything. Keys are relative to the folder: renaming a
dataset or moving it elsewhere with ``path:`` changes no fingerprint.
"""

from __future__ import annotations

import configparser
import csv
import functools
import io
import os
import re
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Any

from loramill.hashing import HashCache, hash_value

# Files operating systems and file managers drop into folders: never data.
SYSTEM_FILES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"})
# The layout of data/<ds>/: each folder a stage reads, with the names it reads there.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SUFFIXES = {
    "images": None,
    "captions": (".txt", ".caption"),
    "masks": None,  # loss masks and their repeats folders (loramill.prepare.masks)
}  # None: every file (resize reports the rest)
# The human caption edits of a dataset, one row per image (loramill.captions.edits).
METADATA = "metadata.csv"
MANIFEST = "manifest.json"  # the resize stage's record of the images it made, in resized/
# kohya sd-scripts' DreamBooth folders: ``images/<repeats>_<concept>/`` (``5_sks dog``).
REPEATS_FOLDER = re.compile(r"(\d+)_(.+)", re.DOTALL)


def repeats_folder(name: str) -> tuple[int, str] | None:
    """``(repeats, concept)`` of a folder named like kohya's ``5_sks dog``, else None. As in
    kohya, the concept is the rest of the name as written (``5_sks_dog`` -> ``sks_dog``) and a
    folder of 0 repeats trains nothing, so it is no repeats folder."""
    match = REPEATS_FOLDER.fullmatch(name)
    if match is None or int(match[1]) < 1:
        return None
    return int(match[1]), unicodedata.normalize("NFC", match[2])


def match_key(name: str) -> str:
    """The name images, their outputs and caption edits are matched on: NFC, case-folded,
    without an image extension (``Café.JPG`` and ``café.png`` are one name)."""
    normal = unicodedata.normalize("NFC", name).casefold()
    stem, suffix = os.path.splitext(normal)
    return stem if suffix in IMAGE_SUFFIXES else normal


def dvc_cache_dirs(project: str | os.PathLike = ".") -> tuple[Path, ...]:
    """Where the project's DVC cache lives: ``.dvc/cache`` unless ``cache.dir`` in
    ``.dvc/config`` or ``.dvc/config.local`` moves it (relative to ``.dvc/``). With
    ``cache.type: symlink`` (DVC's choice when the cache sits on another disk) every image
    is a link into it."""
    return _cache_dirs(Path(project).resolve())


@functools.cache  # read once per process and project: a planning pass asks per linked file
def _cache_dirs(project: Path) -> tuple[Path, ...]:
    dvc = project / ".dvc"
    found = [dvc / "cache"]
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser()
        try:
            parser.read(dvc / name)
        except configparser.Error:
            continue  # DVC itself reports a broken config
        if parser.has_option("cache", "dir"):
            found.append((dvc / parser.get("cache", "dir")).resolve())
    return tuple(found)


def link_allowed(path: str | os.PathLike, dataset_root: str | os.PathLike) -> bool:
    """Whether the link ``path`` resolves to a file inside the dataset or the DVC cache."""
    target = Path(os.path.realpath(path))
    roots = [Path(dataset_root).resolve(), *dvc_cache_dirs()]
    return target.is_file() and any(target.is_relative_to(root) for root in roots)


def is_read(kind: str, name: str) -> bool:
    """Whether a stage reads the entry ``name`` of the dataset folder ``kind``."""
    if name.startswith(".") or name in SYSTEM_FILES:
        return False
    suffixes = SUFFIXES[kind]
    return suffixes is None or name.lower().endswith(suffixes)


def entries(folder: str | os.PathLike, kind: str) -> list[os.DirEntry]:
    """The entries of ``folder`` a stage reads, sorted by name; none when it does not exist."""
    try:
        with os.scandir(folder) as found:
            return sorted((e for e in found if is_read(kind, e.name)), key=lambda e: e.name)
    except FileNotFoundError:
        return []


def folder_hashes(folder: str | os.PathLike, kind: str, hashes: HashCache) -> dict[str, str]:
    """``{name: hash}`` of what the stages read in ``folder``, without following anything out.

    Stages read the top level, and in ``images`` the files of kohya repeats folders too (keyed
    ``5_sks dog/photo.png``, so renaming the folder to another repeat count changes the key).
    A link is hashed by content when it resolves inside the dataset or into the project's DVC
    cache, else by its target, never read: a link to ``/dev/zero`` or a loop must not hang the
    parse (resize quarantines such links).
    """
    folder = os.path.abspath(folder)  # absolute entries: the hash cache skips abspath per file
    root = os.path.dirname(folder)
    found = {}
    for entry in entries(folder, kind):
        found[entry.name] = _entry_hash(entry, root, hashes)
        nested = kind in ("images", "masks") and found[entry.name] == "folder"
        if nested and repeats_folder(entry.name):
            del found[entry.name]  # its files say it all: a rename is theirs, counted once
            for inner in entries(entry.path, kind):
                found[f"{entry.name}/{inner.name}"] = _entry_hash(inner, root, hashes)
    return found


def _entry_hash(entry: os.DirEntry, root: str, hashes: HashCache) -> str:
    if entry.is_symlink() and not link_allowed(entry.path, root):
        return f"link:{os.readlink(entry.path)}"
    if entry.is_dir():
        return "folder"  # resize reports the subfolders it does not read
    if entry.is_file():
        return hashes.file(entry.path)
    return "unreadable"


def row_hashes(path: str | os.PathLike, hashes: HashCache) -> dict[str, Any]:
    """What the rerun decision records of a ``metadata.csv``: the file's hash (any byte
    changed reruns the merge) and each image's row hash, so a stale reason can say how many
    images' edits changed. Read leniently: a malformed file is the merge's to report."""
    rows: dict[str, str] = {}
    try:
        text = Path(path).read_bytes().decode("utf-8-sig", errors="replace")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [column.strip() for column in next(reader, [])]
        for row in reader:
            values = dict(zip(header, row, strict=False))
            name = (values.get("filename") or "").strip()
            if name:
                key = match_key(PurePosixPath(name.replace("\\", "/")).name)
                rows[key] = hash_value([rows.get(key), values])
    except csv.Error:
        pass  # the file's hash still decides
    return {"file": hashes.file(path), "rows": rows}

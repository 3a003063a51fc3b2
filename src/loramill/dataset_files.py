"""Which files of a dataset folder the stages read, and their content hashes.

One answer serves both the stages (resize lists its images here, merge its caption edits) and
the rerun decision (a stage's fingerprint covers exactly these files), so a ``.DS_Store`` the
stages never read cannot retrain anything. Keys are relative to the folder: renaming a
dataset or moving it elsewhere with ``path:`` changes no fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path

from loramill.hashing import HashCache

# Files operating systems and file managers drop into folders: never data.
SYSTEM_FILES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"})
# The layout of data/<ds>/: each folder a stage reads, with the names it reads there.
SUFFIXES = {"images": None, "captions": (".txt",)}  # None: every file (resize reports the rest)


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

    Stages read only the top level. A link is hashed by content when it resolves inside the
    dataset or into the project's DVC cache, else by its target, never read: a link to
    ``/dev/zero`` or a loop must not hang the parse (resize quarantines such links).
    """
    folder = os.path.abspath(folder)  # absolute entries: the hash cache skips abspath per file
    root = Path(folder).resolve().parent
    allowed = (root, Path(".dvc/cache").resolve())
    found = {}
    for entry in entries(folder, kind):
        if entry.is_symlink():
            target = Path(os.path.realpath(entry.path))
            if not any(target.is_relative_to(base) for base in allowed) or not target.is_file():
                found[entry.name] = f"link:{os.readlink(entry.path)}"
                continue
        if entry.is_dir():
            found[entry.name] = "folder"  # resize reports subfolders, never reads them
        elif entry.is_file():
            found[entry.name] = hashes.file(entry.path)
        else:
            found[entry.name] = "unreadable"
    return found

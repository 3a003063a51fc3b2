"""Content hashes for provenance: files, directory trees and parsed config.

A directory hashes as the sorted ``relpath NUL filehash`` manifest, so renaming, adding or
editing any file changes it while mtimes and checkout order do not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Snakemake drops this marker into directory() outputs after a job; it is not content.
IGNORED_NAMES = frozenset({".snakemake_timestamp"})
CHUNK = 1 << 20


def hash_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(root: str | os.PathLike) -> list[Path]:
    """Files under ``root`` in a stable order, without Snakemake's markers."""
    base = Path(root)
    return sorted(
        (p for p in base.rglob("*") if p.is_file() and p.name not in IGNORED_NAMES),
        key=lambda p: p.relative_to(base).as_posix(),
    )


def hash_tree(root: str | os.PathLike) -> str:
    base = Path(root)
    digest = hashlib.sha256()
    for path in tree_files(base):
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(b"\0")
        digest.update(hash_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def hash_path(path: str | os.PathLike) -> str:
    return hash_tree(path) if Path(path).is_dir() else hash_file(path)


def hash_value(value: Any) -> str:
    """Hash parsed data (config sections) so formatting and key order do not matter."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()

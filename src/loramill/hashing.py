"""Content hashes for provenance: files, directory trees and parsed config.

A directory hashes as the sorted ``relpath NUL filehash`` manifest, so renaming, adding or
editing any file changes it while mtimes and checkout order do not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Filesystems whose file locking SQLite cannot trust (its documentation: do not share a
# database over a network filesystem).
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs"}
)

# A1111's "legacy" hashes (of a LoRA, of a checkpoint) read 64 KiB at 1 MiB into the file.
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


def filesystem_type(path: str | os.PathLike, mounts: str = "/proc/mounts") -> str:
    """The type of the filesystem ``path`` is on (the longest mount point that holds it)."""
    target, best, kind = os.path.realpath(path), "", ""
    with contextlib.suppress(OSError), open(mounts, encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            point = fields[1].replace("\\040", " ") if len(fields) > 2 else ""
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if point and inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def hash_db_path(cache: str | os.PathLike = ".cache", mounts: str = "/proc/mounts") -> Path:
    """Where the hash cache lives: ``LORAMILL_HASH_DB`` when set; else in ``cache`` (shared by
    the workflow's parse-time checks and its jobs), unless that is on a network filesystem (a
    cluster's shared project folder), where each node keeps its own in its temporary folder:
    it is only a cache of file hashes, and SQLite's locking does not hold over NFS."""
    if os.environ.get("LORAMILL_HASH_DB"):
        return Path(os.environ["LORAMILL_HASH_DB"])
    folder = Path(cache)
    if filesystem_type(folder.parent if not folder.exists() else folder, mounts) in (
        NETWORK_FILESYSTEMS
    ):
        project = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:16]
        local = Path(os.environ.get("TMPDIR") or "/tmp")
        return local / f"loramill-hashes-{os.getuid()}-{project}.sqlite"
    return folder / "hashes.sqlite"


DEFAULT_DB = hash_db_path()
# Snakemake drops this marker into directory() outputs after a job; it is not content.
IGNORED_NAMES = frozenset({".snakemake_timestamp"})
CHUNK = 1 << 20


def hash_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def walk(root: str | os.PathLike) -> list[tuple[str, os.DirEntry]]:
    """``(relative posix path, entry)`` of every file under ``root``, sorted by path,
    without Snakemake's markers. scandir keeps this at one stat per file."""
    found: list[tuple[str, os.DirEntry]] = []
    folders = [("", os.fspath(root))]
    while folders:
        relative, folder = folders.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                name = f"{relative}{entry.name}"
                if entry.is_dir():
                    folders.append((name + "/", entry.path))
                elif entry.is_file() and entry.name not in IGNORED_NAMES:
                    found.append((name, entry))
    return sorted(found, key=lambda item: item[0])


def tree_files(root: str | os.PathLike) -> list[Path]:
    """Files under ``root`` in a stable order, without Snakemake's markers."""
    return [Path(entry.path) for _, entry in walk(root)]


def manifest_hash(files: dict[str, str]) -> str:
    """Hash of a folder from its ``relative path → file hash`` map."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        digest.update(f"{relative}\0{files[relative]}\n".encode())
    return digest.hexdigest()


def hash_value(value: Any) -> str:
    """Hash parsed data (config sections) so formatting and key order do not matter."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class HashCache:
    """File hashes remembered across runs in sqlite, like DVC's state database.

    An entry is trusted while the file's (inode, size, mtime_ns) are unchanged, so a warm
    lookup costs one stat. Rows are read once and written back in one transaction.
    """

    def __init__(self, db_path: str | os.PathLike | None = None) -> None:
        self.db_path = Path(db_path) if db_path else None
        self._rows: dict[str, tuple[int, int, int, str]] = {}
        self._dirty: dict[str, tuple[int, int, int, str]] = {}
        self._memo: dict[str, Any] = {}  # one parse asks for the same folders many times
        self._derived: dict[str, tuple[str, str]] = {}
        self._derived_dirty: dict[str, tuple[str, str]] = {}
        if self.db_path and self.db_path.exists():
            with self._connect() as db:
                self._rows = {r[0]: tuple(r[1:]) for r in db.execute("SELECT * FROM hashes")}
                rows = db.execute("SELECT * FROM derived")
                self._derived = {r[0]: (r[1], r[2]) for r in rows}

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        import sqlite3

        # Parallel jobs share the database: wait for each other's short write transactions.
        db = sqlite3.connect(self.db_path, timeout=60)
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, inode INTEGER, "
                "size INTEGER, mtime_ns INTEGER, sha256 TEXT)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS derived (key TEXT PRIMARY KEY, files TEXT, value TEXT)"
            )
            with db:
                yield db
        finally:
            db.close()

    def file(self, path: str | os.PathLike, stat: os.stat_result | None = None) -> str:
        key = os.fspath(path)
        if not key.startswith("/"):  # the per-file cost matters for datasets of 10 000 images
            key = os.path.abspath(key)
        stat = stat or os.stat(key)
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        row = self._dirty.get(key) or self._rows.get(key)
        if row and row[:3] == signature:
            return row[3]
        digest = hash_file(key)
        self._dirty[key] = (*signature, digest)
        return digest

    def tree(self, root: str | os.PathLike, prefix: str = "") -> dict[str, str]:
        """``{prefix + relative path: hash}`` for every file under ``root``."""
        base = os.path.abspath(root)
        return {
            prefix + relative: self.file(entry.path, entry.stat()) for relative, entry in walk(base)
        }

    def digest(self, path: str | os.PathLike) -> str:
        """One hash for a file, or for a folder (its manifest hash, computed once)."""
        if not os.path.isdir(path):
            return self.file(path)
        key = os.path.abspath(path)
        return self.remember(f"tree:{key}", lambda: manifest_hash(self.tree(key)))

    def remember(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once for the life of this cache (one parse, one job)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def derived(self, key: str, compute: Callable[[], tuple[Any, list[str]]]) -> Any:
        """A value computed from files, kept across runs while none of them changed.

        ``compute()`` returns the value (JSON data) and the files it read; a warm lookup
        costs one stat per file, like a file hash.
        """
        row = self._derived_dirty.get(key) or self._derived.get(key)
        if row and json.loads(row[0]) == _signatures(json.loads(row[0])):
            return json.loads(row[1])
        value, files = compute()
        signed = [[path, *_signature(path)] for path in sorted(map(os.path.abspath, files))]
        self._derived_dirty[key] = (json.dumps(signed), json.dumps(value))
        return value

    def save(self) -> None:
        if not (self.db_path and (self._dirty or self._derived_dirty)):
            return
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            rows = [(k, *v) for k, v in self._dirty.items()]
            db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", rows)
            derived = [(k, *v) for k, v in self._derived_dirty.items()]
            db.executemany("INSERT OR REPLACE INTO derived VALUES (?, ?, ?)", derived)
        self._rows.update(self._dirty)
        self._dirty.clear()
        self._derived.update(self._derived_dirty)
        self._derived_dirty.clear()


def _signature(path: str) -> list[int]:
    try:
        stat = os.stat(path)
    except OSError:
        return [-1, -1, -1]
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def _signatures(signed: list[list[Any]]) -> list[list[Any]]:
    """The same list, with each file's (inode, size, mtime) as it is now."""
    return [[entry[0], *_signature(entry[0])] for entry in signed]


def legacy_hash(window: bytes) -> str:
    """AUTOMATIC1111's old 8-digit hash of a file, from its bytes at LEGACY_OFFSET (the
    additional-networks hash of a LoRA, the model hash of a checkpoint)."""
    return hashlib.sha256(window).hexdigest()[:8]

"""The run-cache: a finished job's outputs kept under its fingerprint, restored instead of
recomputed when that fingerprint comes back (a reverted config, a byte-identical input).

An entry is ``.cache/runs/<fingerprint>/<output name>`` (a file or a folder tree) and a
``.complete`` marker; it holds no paths, so it restores into any dataset's outputs.

- Files inside folder outputs (checkpoints, tensorboard, resized images: the bulk) are
  hardlinked (across filesystems a reflink, else a copy): caching or restoring them takes
  microseconds and their bytes are stored once. Safe because loramill writes every output
  atomically (temp file + ``os.replace``: a new inode), never in place. Cached files are
  read-only, and so are the outputs sharing their inode (as with DVC's hardlink cache type): an
  in-place edit fails instead of silently changing the cache. A file output is copied instead
  (reflinked where it can), as Snakemake will not run a job over a write-protected output file.
- Entries appear and go by one rename (staging → entry, entry → trash): a reader sees a whole
  entry or none, and two jobs storing one fingerprint do not collide. A store never raises: it
  runs after the job's real work, which a cache must not fail.
- Capped (20 GiB, ``LORAMILL_RUN_CACHE_MAX_GB``) by dropping the least recently used entries
  (a restore touches the entry), never one a lock in ``locks/`` names: a fresh clone's jobs ask
  for those. ``python -m loramill.reruns.run_cache gc`` (``make gc``) drops all the
  unreferenced ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loramill.files import write_text
from loramill.hashing import IGNORED_NAMES

RUNS = Path(".cache/runs")  # relative to the workflow's working directory
LOCKS = Path("locks")
DEFAULT_MAX_BYTES = 20 * 2**30
MAX_GB_ENV = "LORAMILL_RUN_CACHE_MAX_GB"
COMPLETE = ".complete"  # written last into the staging folder: an entry without it is not one
STAGING = ".staging-"
TRASH = ".trash-"
STAGING_MAX_AGE_S = 3600  # a younger staging folder may belong to a store in progress
FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, xfs with reflink=1)
WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

log = logging.getLogger("loramill")

Inode = tuple[int, int]  # (st_dev, st_ino): a file's data, however many names it has


@dataclass
class GcReport:
    removed: int = 0
    freed_bytes: int = 0
    kept: int = 0
    total_bytes: int = 0  # after gc, each inode counted once
    cache_only_bytes: int = 0  # of total_bytes, data no output outside the cache links to

    def line(self) -> str:
        return (
            f"run-cache: removed {self.removed} entr{'y' if self.removed == 1 else 'ies'} "
            f"({human(self.freed_bytes)}), kept {self.kept} ({human(self.total_bytes)}, "
            f"{human(self.cache_only_bytes)} of it only in the cache)"
        )


def human(size: int) -> str:
    """Binary units, like ``du -h`` and the cap (20 GB is 20 * 2**30 bytes)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1.5G`` (binary units; a plain number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M, 20G or 1.5G")
    return int(float(match[1]) * UNITS[match[2].upper()])


def _check_names(names: list[str]) -> None:
    # A name is one path component, not a dot name (those are the marker and our temp folders).
    for name in names:
        if not name or name.startswith(".") or "/" in name or os.sep in name:
            raise ValueError(f"run-cache output name {name!r} is not a plain name")


def _reflink(source: str, destination: str) -> bool:
    try:
        import fcntl
    except ImportError:  # not a Unix
        return False
    with open(source, "rb") as src, open(destination, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:  # ext4, tmpfs, or across filesystems: copy instead
            return False
    return True


def link_data(source: str, destination: str, share: bool) -> None:
    """A new name for ``source``'s data: a hardlink if ``share``, else (or across filesystems)
    a reflink, else a copy."""
    if share:
        with contextlib.suppress(OSError):  # EXDEV, EPERM (no hardlinks), EMLINK: copy instead
            os.link(source, destination)
            return
    if _reflink(source, destination):
        shutil.copystat(source, destination)
    else:
        shutil.copy2(source, destination)


def _set_writable(path: Path, writable: bool) -> None:
    mode = os.stat(path).st_mode
    wanted = mode | stat.S_IWUSR if writable else mode & ~WRITE_BITS
    if wanted != mode:
        os.chmod(path, wanted)


def _place(source: Path, destination: Path, restoring: bool = False) -> None:
    """Recreate the file or folder tree ``source`` at the new path ``destination``.

    Files in a folder are hardlinked, read-only. A file output is copied (reflinked where the
    filesystem can) and stays writable: Snakemake refuses to run a job over a write-protected
    output file (its ``protected()`` check), and folder outputs are not checked that way.
    """
    if not source.is_dir():
        link_data(os.fspath(source), os.fspath(destination), share=False)
        _set_writable(destination, restoring)  # the cache's copy is read-only, the output not
        return
    for folder, _, files in os.walk(source):
        target = destination / os.path.relpath(folder, source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name not in IGNORED_NAMES:
                link_data(os.path.join(folder, name), os.fspath(target / name), share=True)
                _set_writable(target / name, False)


def _remove_tree(path: Path) -> None:
    """Remove a file or tree, first making its folders writable (files stay read-only: they
    may be linked from outputs)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    os.chmod(path, path.stat().st_mode | stat.S_IRWXU)
    for folder, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(folder, name)
            if not os.path.islink(child):
                os.chmod(child, os.stat(child).st_mode | stat.S_IRWXU)
    shutil.rmtree(path)


def _discard(entry: Path, root: Path) -> None:
    """Rename the entry away in one step (readers see it whole or gone), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f"{TRASH}{entry.name}-", dir=root))
    try:
        os.replace(entry, trash / entry.name)
    finally:
        _remove_tree(trash)


def store(fingerprint: str, outputs: dict[str, str], root: Path = RUNS) -> None:
    """Keep a finished job's outputs (name → path) under its fingerprint. Never raises."""
    entry, staging = root / fingerprint, None
    try:
        _check_names(list(outputs))
        if (entry / COMPLETE).is_file():
            return
        root.mkdir(parents=True, exist_ok=True)
        prefix = f"{STAGING}{fingerprint}-{os.getpid()}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        for name, path in outputs.items():
            if os.path.exists(path):
                _place(Path(path), staging / name)
        write_text(staging / COMPLETE, "")
        if entry.exists():  # no marker: a crash's or an older layout's leftover
            _discard(entry, root)
        os.replace(staging, entry)
        staging = None
    except (OSError, ValueError) as error:
        # Losing the race to another job storing the same fingerprint is expected and fine.
        if not (entry / COMPLETE).is_file():
            log.warning("run-cache: %s not stored: %s", fingerprint[:12], error)
        return
    finally:
        if staging is not None:
            with contextlib.suppress(OSError):
                _remove_tree(staging)
    try:
        gc(referenced_fingerprints() | {fingerprint}, max_bytes_setting(), root)
    except OSError as error:
        log.warning("run-cache: could not prune: %s", error)


def _replace(source: Path, destination: Path) -> None:
    """Build the restored output beside ``destination``, then swap it in."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.restore-", dir=destination.parent))
    try:
        built = scratch / "new"
        _place(source, built, restoring=True)
        # os.replace puts a file over a file in one step; a folder needs the old one moved away.
        if os.path.lexists(destination) and (built.is_dir() or destination.is_dir()):
            os.replace(destination, scratch / "old")
        os.replace(built, destination)
    finally:
        _remove_tree(scratch)


def restore(fingerprint: str, outputs: dict[str, str], root: Path = RUNS) -> bool:
    """Put the cached outputs (name → destination path) in place; False when not cached.

    A name the entry lacks is left alone (optional outputs, like logs, may not have existed).
    """
    _check_names(list(outputs))
    entry = root / fingerprint
    if not (entry / COMPLETE).is_file():
        return False
    try:
        for name, path in outputs.items():
            if os.path.lexists(entry / name):
                _replace(entry / name, Path(path))
        os.utime(entry)  # "last used", for gc's least-recently-used order
    except OSError as error:  # say a gc removed the entry meanwhile: the job computes instead
        log.warning("run-cache: %s not restored: %s", fingerprint[:12], error)
        return False
    return True


def referenced_fingerprints(locks_dir: Path = LOCKS) -> set[str]:
    """The fingerprints the committed locks ``locks/<dataset>/<stage>.json`` name."""
    found = set()
    for lock in locks_dir.glob("*/*.json"):
        try:
            data = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a broken lock (say, a bad merge) keeps nothing
            continue
        if isinstance(data, dict) and isinstance(data.get("fingerprint"), str):
            found.add(data["fingerprint"])
    return found


def max_bytes_setting() -> int:
    value = os.environ.get(MAX_GB_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        return int(float(value) * 2**30)
    except ValueError:
        log.warning("run-cache: %s=%r is not a number of GB; using 20", MAX_GB_ENV, value)
        return DEFAULT_MAX_BYTES


def _scan(entry: Path) -> tuple[Counter[Inode], dict[Inode, tuple[int, int]]]:
    """The entry's inodes (with how many of its names link to each) and their size, nlink."""
    links: Counter[Inode] = Counter()
    stats: dict[Inode, tuple[int, int]] = {}
    for folder, _, files in os.walk(entry):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # another job's gc removed the entry meanwhile
                continue
            inode = (info.st_dev, info.st_ino)
            links[inode] += 1
            stats[inode] = (info.st_size, info.st_nlink)
    return links, stats


def _sweep(root: Path) -> None:
    """Delete what crashed stores and gcs left: trash, and staging older than an hour."""
    for child in root.iterdir():
        with contextlib.suppress(OSError):  # another gc may be deleting it too
            old = time.time() - child.lstat().st_mtime > STAGING_MAX_AGE_S
            if child.name.startswith(TRASH) or (child.name.startswith(STAGING) and old):
                _remove_tree(child)


def _last_used(entry: Path) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:  # another job's gc removed it: nothing to weigh
        return 0.0


def gc(keep: set[str], max_bytes: int | None = None, root: Path = RUNS) -> GcReport:
    """Remove entries not in ``keep``, least recently used first, until the cache holds at
    most ``max_bytes`` (None: remove every one). Each inode is counted once."""
    report = GcReport()
    if not root.is_dir():
        return report
    _sweep(root)
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=_last_used)
    scans = {entry.name: _scan(entry) for entry in entries}
    links: Counter[Inode] = Counter()
    stats: dict[Inode, tuple[int, int]] = {}
    for entry_links, entry_stats in scans.values():
        links.update(entry_links)
        stats.update(entry_stats)
    # Data linked only from the cache: its nlink is the number of the cache's names for it.
    only_cache = {inode for inode, (_, nlink) in stats.items() if links[inode] == nlink}
    total = sum(size for size, _ in stats.values())
    for entry in entries:
        if entry.name in keep or (max_bytes is not None and total <= max_bytes):
            report.kept += 1
            continue
        try:
            _discard(entry, root)
        except FileNotFoundError:  # another job's gc was first
            pass
        except OSError as error:
            log.warning("run-cache: could not remove %s: %s", entry.name[:12], error)
            report.kept += 1
            continue
        report.removed += 1
        links.subtract(scans[entry.name][0])
        for inode in scans[entry.name][0]:
            if links[inode] <= 0:  # its last name in the cache is gone
                report.freed_bytes += stats[inode][0]
                total -= stats[inode][0]
                del links[inode]
    report.total_bytes = total
    report.cache_only_bytes = sum(stats[inode][0] for inode in links if inode in only_cache)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramill.reruns.run_cache")
    commands = parser.add_subparsers(dest="command", required=True)
    collect = commands.add_parser("gc", help="remove cached runs no lock in locks/ references")
    how = collect.add_mutually_exclusive_group()
    size_help = "keep unreferenced runs too while the cache stays under SIZE (500M, 20G, 1.5G)"
    how.add_argument("--max-size", type=parse_size, metavar="SIZE", help=size_help)
    how.add_argument("--all", action="store_true", help="remove every unreferenced run (default)")
    args = parser.parse_args(argv)
    print(gc(referenced_fingerprints(), args.max_size).line())  # --all: max_size is None
    return 0


if __name__ == "__main__":
    sys.exit(main())

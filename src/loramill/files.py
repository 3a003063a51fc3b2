"""Atomic output writing and path safety.

Every output goes to a temporary file in the destination directory and is moved into place
with ``os.replace``: a reader never sees half a file, and a file DVC hardlinked into its
cache is replaced rather than rewritten in place (writing through the link would corrupt the
cache object).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from loramill import LoramillError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes files 0600 (and writers may recreate them): give the permissions a
        # plain open() would have given.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` (an
    earlier folder there is removed first), on failure it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when closed without error."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON with sorted keys so equal data gives equal bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    lines = (json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records)
    write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a bad line is reported with file and line number."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise LoramillError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Resolve ``path`` (relative to ``root`` if relative) and refuse anything outside ``root``.

    Symlinks are resolved first, so a link pointing out of the dataset is refused too.
    """
    root_resolved = Path(root).resolve()
    resolved = (root_resolved / path).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise LoramillError(f"{path}: path escapes {root}")
    return resolved


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def serialize_safetensors(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with a canonical header.

    The safetensors writer emits ``__metadata__`` in hash-map order, which changes from one
    process to the next; sorting the header makes equal inputs give equal bytes. Offsets are
    relative to the data section, which is left untouched, so the file stays valid.
    """
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata or {}))
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    canonical = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    canonical.update(sorted(header.items()))
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the writer's own alignment of the data section
    return len(text).to_bytes(8, "little") + text + raw[8 + length :]


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors atomically, bit-identical for equal inputs."""
    write_bytes(path, serialize_safetensors(tensors, metadata))

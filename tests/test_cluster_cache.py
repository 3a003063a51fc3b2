"""The hash cache on a cluster (issue #16): SQLite's locking does not hold on a network
filesystem, so there each node keeps its own; elsewhere it stays in .cache/."""

from __future__ import annotations

from pathlib import Path

from loramill.hashing import filesystem_type, hash_db_path

MOUNTS = """\
overlay / overlay rw 0 0
server:/export/projects /projects nfs4 rw,relatime 0 0
/dev/sda1 /projects/local ext4 rw 0 0
"""


def test_a_project_on_nfs_keeps_its_hash_cache_on_the_node(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert filesystem_type("/projects/studio/.cache", str(mounts)) == "nfs4"
    assert filesystem_type("/projects/local/x", str(mounts)) == "ext4"
    assert filesystem_type("/projectsX", str(mounts)) == "overlay"
    monkeypatch.delenv("LORAMILL_HASH_DB", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node"))
    on_nfs = hash_db_path("/projects/studio/.cache", str(mounts))
    assert on_nfs.parent == tmp_path / "node" and on_nfs.name.startswith("loramill-hashes-")
    # one project, one file per node; another project, another file
    assert hash_db_path("/projects/studio/.cache", str(mounts)) == on_nfs
    assert hash_db_path("/projects/other/.cache", str(mounts)) != on_nfs
    assert hash_db_path("/projects/local/.cache", str(mounts)) == Path(
        "/projects/local/.cache/hashes.sqlite"
    )
    monkeypatch.setenv("LORAMILL_HASH_DB", str(tmp_path / "mine.sqlite"))
    assert hash_db_path("/projects/studio/.cache", str(mounts)) == tmp_path / "mine.sqlite"

"""Older resize code whose cached images the current code would make byte for byte.

The resize stage keys its per-image cache by the fingerprint of its code (loramill.prepare.resize),
so a change to how code is fingerprinted misses every entry once, though no pixel would change.
Here the current code's fingerprint names the older fingerprints whose entries it reads. An
entry stops applying by itself once the resize code changes (its key is then no one's), and
tests/test_resize.py fails until it is removed. Editing this table reruns nothing: the module is
left out of code fingerprints.
"""

__fingerprinted__ = False

SAME_PIXELS: dict[str, tuple[str, ...]] = {
    # The resize code of loramill before its subpackages (80e8114), then keyed by module path
    # (its pixel code is unchanged since: a move, renamed imports and this table's lookup).
    "0dfa65ed8c87af9c166fafef276d5159566de15c1e1a905a8c361547d62704a2": (
        "4f0ffc541c453e269f3a2dc454f9696bbcee58e9c70680a6e6c724ff8f3242c8",
    ),
}

"""The code fingerprint follows what a stage runs, definition by definition, and nothing else.

Most tests build a small fake package in tmp_path and compare the fingerprints of two copies,
one of them edited: an edit must change exactly the part it touches, or nothing.
"""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from loramill.reruns import runner
from loramill.reruns.code import CodeFingerprint, code_fingerprint

PACKAGE = {
    "__init__.py": """
        class PkgError(Exception):
            pass
    """,
    "util.py": '''
        """Helpers."""
        import json

        import numpy

        SCALE = 3  # a constant


        def helper(x):
            """Scale."""
            return x * SCALE


        def unused(x):
            return json.dumps(numpy.zeros(x))
    ''',
    "consts.py": """
        LIMIT = 5


        def heavy():
            return LIMIT * 2


        if __name__ == "__main__":
            print(heavy())
    """,
    "late.py": """
        def late_value():
            return 7
    """,
    "core.py": """
        import PIL.Image

        from fakepkg import PkgError
        from fakepkg.util import helper


        def compute(x):
            if x < 0:
                raise PkgError(x)
            return helper(x) + deferred()


        def deferred():
            from fakepkg.late import late_value

            return late_value() + PIL.Image.MAX_IMAGE_PIXELS


        def never_called():
            return 0
    """,
    "job.py": """
        def run(function, *args):
            return function(*args)


        __fingerprinted__ = False  # infrastructure, like loramill.reruns.runner
    """,
}
FOLLOWED = "def run(function, *args):\n    return function(*args)\n"  # job.py, unmarked
SCRIPT = """
    from fakepkg.consts import LIMIT
    from fakepkg.core import compute
    from fakepkg.job import run

    run(compute, LIMIT)
"""


def build(root: Path, script: str = SCRIPT, **files: str) -> tuple[Path, Path]:
    """Write the fake package (``files`` add or replace modules) and a stage script."""
    package = root / "src" / "fakepkg"
    package.mkdir(parents=True)
    for name, source in {**PACKAGE, **files}.items():
        (package / name).write_text(textwrap.dedent(source))
    (root / "scripts").mkdir()
    (root / "scripts" / "stage.py").write_text(textwrap.dedent(script))
    return root / "scripts" / "stage.py", package


def fingerprint(root: Path, script: str = SCRIPT, **files: str) -> CodeFingerprint:
    entry, package = build(root, script, **files)
    return code_fingerprint(entry, package_dir=package)


def edited(name: str, old: str, new: str) -> dict[str, str]:
    """Keyword arguments for ``fingerprint`` with one replacement in one file."""
    source = textwrap.dedent(SCRIPT if name == "stage.py" else PACKAGE[name])
    assert old in source, old
    changed = source.replace(old, new)
    return {"script": changed} if name == "stage.py" else {name: changed}


def test_reaches_the_definitions_used_and_their_packages(tmp_path):
    result = fingerprint(tmp_path)
    assert list(result.placed) == [
        "fakepkg.consts:LIMIT",  # not heavy(): imported for a constant only
        "fakepkg.core:compute",
        "fakepkg.core:deferred",  # not never_called()
        "fakepkg.late:late_value",  # imported inside a function body
        "fakepkg.util:SCALE",  # read by helper(): transitive
        "fakepkg.util:helper",  # not unused()
        "fakepkg:PkgError",  # from the package's __init__
        "scripts/stage.py",  # no fakepkg.job: skipped
    ]
    # numpy is imported by util, but only unused() uses it; json is stdlib.
    assert result.packages == ("pillow",)
    assert all(len(digest) == 64 for digest in result.placed.values())


UNCHANGED = {
    "comment": ("util.py", "SCALE = 3  # a constant", "SCALE = 3  # the scale factor"),
    "docstring": ("util.py", '"""Scale."""', '"""Multiply by the scale.\n\n    More."""'),
    "module docstring": ("util.py", '"""Helpers."""', '"""Helper functions."""'),
    "formatting": ("util.py", "return x * SCALE", "return (\n        x*SCALE\n    )"),
    "script comment": ("stage.py", "run(compute, LIMIT)", "# go\nrun(compute,  LIMIT)  # !"),
    "unused function": ("util.py", "numpy.zeros(x)", "numpy.ones(x)"),
    "other function of a constant's module": ("consts.py", "LIMIT * 2", "LIMIT * 3"),
    "function never called": ("core.py", "return 0", "return 1"),
    "main guard": ("consts.py", "print(heavy())", "print(-heavy())"),
    "skipped module": ("job.py", "function(*args)", "function(*args) or None"),
}


@pytest.mark.parametrize("edit", UNCHANGED.values(), ids=UNCHANGED.keys())
def test_edits_that_change_nothing_it_runs(tmp_path, edit):
    before = fingerprint(tmp_path / "a")
    assert fingerprint(tmp_path / "b", **edited(*edit)) == before


CHANGED = {
    "used function": (("core.py", "helper(x) + deferred()", "helper(x) - deferred()"), "core"),
    "transitive helper": (("util.py", "x * SCALE", "x + SCALE"), "util:helper"),
    "helper's constant": (("util.py", "SCALE = 3", "SCALE = 4"), "util:SCALE"),
    "imported constant": (("consts.py", "LIMIT = 5", "LIMIT = 6"), "consts:LIMIT"),
    "function-local import": (("late.py", "return 7", "return 8"), "late:late_value"),
    "package __init__": (("__init__.py", "pass", "code = 1"), "fakepkg:PkgError"),
    "script": (("stage.py", "run(compute, LIMIT)", "run(compute, -LIMIT)"), "scripts/"),
}


@pytest.mark.parametrize(("edit", "part"), CHANGED.values(), ids=CHANGED.keys())
def test_an_edit_to_what_runs_changes_its_part_only(tmp_path, edit, part):
    before = fingerprint(tmp_path / "a").placed
    after = fingerprint(tmp_path / "b", **edited(*edit)).placed
    assert before.keys() == after.keys()
    changed = [key for key in before if before[key] != after[key]]
    assert len(changed) == 1 and part in changed[0], changed


@pytest.mark.parametrize(
    "script",
    [
        "from fakepkg.job import run\nrun(print)\n",
        "from fakepkg import job\njob.run(print)\n",
        "import fakepkg.job\nfakepkg.job.run(print)\n",
    ],
    ids=["from module import", "from package import module", "import dotted"],
)
def test_a_skipped_module_is_not_followed(tmp_path, script):
    assert "fakepkg.job:run" in fingerprint(tmp_path / "a", script, **{"job.py": FOLLOWED}).placed
    assert list(fingerprint(tmp_path / "b", script).placed) == ["scripts/stage.py"]


def test_a_module_that_says_it_is_not_fingerprinted_is_not_followed_wherever_it_lives(tmp_path):
    job = textwrap.dedent(PACKAGE["job.py"])
    result = fingerprint(tmp_path / "a")
    assert not [place for place in result.placed if place.startswith("fakepkg.job")]
    moved = SCRIPT.replace("fakepkg.job", "fakepkg.runner")
    elsewhere = fingerprint(tmp_path / "b", moved, **{"runner.py": job, "job.py": FOLLOWED})
    assert elsewhere == result
    assert "fakepkg.job:run" in fingerprint(tmp_path / "c", **{"job.py": FOLLOWED}).placed


UNRESOLVABLE = {
    "set dynamically": (
        "from fakepkg.dyn import made\nmade()\n",
        {"dyn.py": 'globals()["made"] = lambda: 1\n\n\ndef other():\n    return 2\n'},
        "fakepkg.dyn:*",
    ),
    "read through globals()": (
        "from fakepkg.dyn import call\ncall()\n",
        {"dyn.py": "def call():\n    return globals()['other']()\n\n\nother = print\n"},
        "fakepkg.dyn:*",
    ),
    "star import": (  # what the star brings in: all of its source
        "from fakepkg.star import thing\nthing()\n",
        {"star.py": "from fakepkg.util import *\n\n\ndef thing():\n    return helper(1)\n"},
        "fakepkg.util:*",
    ),
    "module used as a value": ("from fakepkg import util\nprint(util)\n", {}, "fakepkg.util:*"),
}


@pytest.mark.parametrize(("script", "files", "part"), UNRESOLVABLE.values(), ids=UNRESOLVABLE)
def test_an_unresolvable_name_counts_the_whole_module(tmp_path, script, files, part):
    result = fingerprint(tmp_path / "a", script, **files)
    assert part in result.placed
    # Its definitions are inside that part, not listed again.
    assert [key for key in result.placed if key.startswith(part.replace("*", ""))] == [part]
    module = part.split(".")[1].split(":")[0] + ".py"
    source = textwrap.dedent({**PACKAGE, **files}[module])
    changed = fingerprint(tmp_path / "b", script, **{**files, module: source + "\n\nANOTHER = 1\n"})
    assert changed.placed[part] != result.placed[part]


def test_a_star_import_reaches_its_source_whole(tmp_path):
    script, files, _ = UNRESOLVABLE["star import"]
    result = fingerprint(tmp_path, script, **files)
    assert {"fakepkg.star:thing", "fakepkg.util:*"} <= result.placed.keys()
    assert "numpy" in result.packages  # util's imports count once all of util does


@pytest.mark.parametrize(
    "script",
    [
        "from fakepkg import util\nutil.helper(1)\n",
        "import fakepkg.util\nfakepkg.util.helper(1)\n",
        "import fakepkg.util as u\nu.helper(1)\n",
        "from fakepkg.rel import twice\ntwice(1)\n",
    ],
    ids=["from package import module", "import dotted", "import as", "relative import"],
)
def test_module_attributes_and_relative_imports_resolve_to_definitions(tmp_path, script):
    rel = "from . import util\nfrom .util import helper\n\n\ndef twice(x):\n"
    rel += "    return helper(x) + util.helper(x)\n"
    parts = fingerprint(tmp_path, script, **{"rel.py": rel}).placed
    assert {"fakepkg.util:helper", "fakepkg.util:SCALE"} <= parts.keys()
    assert not [key for key in parts if key in ("fakepkg.util:unused", "fakepkg.util:*")]


REGISTRY = """
    REGISTRY = {}


    def register(cls):
        REGISTRY[cls.__name__] = cls
        return cls


    @register
    class Plain:
        value = 1


    class Extra:
        value = 2


    REGISTRY["extra"] = Extra


    def lookup(name):
        return REGISTRY[name]
"""


@pytest.mark.parametrize(
    ("old", "new", "part"),
    [("value = 1", "value = -1", "Plain"), ("value = 2", "value = -2", "Extra")],
    ids=["decorator", "store into the registry"],
)
def test_what_registers_itself_at_import_counts(tmp_path, old, new, part):
    script = "from fakepkg.reg import lookup\nlookup('Plain')\n"
    before = fingerprint(tmp_path / "a", script, **{"reg.py": REGISTRY}).placed
    changed = textwrap.dedent(REGISTRY).replace(old, new)
    after = fingerprint(tmp_path / "b", script, **{"reg.py": changed}).placed
    assert f"fakepkg.reg:{part}" in before
    assert [key for key in before if before[key] != after[key]] == [f"fakepkg.reg:{part}"]


def test_a_tuple_target_binds_each_name(tmp_path):
    script = "from fakepkg.pair import HIGH\nprint(HIGH)\n"
    result = fingerprint(tmp_path, script, **{"pair.py": "LOW, (MID, *HIGH) = 1, (5, 9)\n"})
    assert list(result.placed) == ["fakepkg.pair:HIGH", "scripts/stage.py"]


OPTIONAL = """
    try:
        import numpy as np
    except ImportError:
        np = None

    if np is not None:

        def choose():
            return np
"""


def test_definitions_inside_top_level_blocks_are_found(tmp_path):
    script = "from fakepkg.optional import choose\nchoose()\n"
    result = fingerprint(tmp_path, script, **{"optional.py": OPTIONAL})
    expected = ["fakepkg.optional:choose", "fakepkg.optional:np", "scripts/stage.py"]
    assert list(result.placed) == expected
    assert result.packages == ("numpy",)


def test_postponed_annotations_reach_nothing(tmp_path):
    typed = "from __future__ import annotations\n\nfrom fakepkg.late import late_value\n\n\n"
    typed += "def f(x: late_value) -> late_value:\n    return x\n"
    parts = fingerprint(tmp_path, "from fakepkg.typed import f\nf(1)\n", **{"typed.py": typed})
    assert "fakepkg.typed:f" in parts.placed
    assert "fakepkg.late:late_value" not in parts.placed


def test_packages_are_distributions_and_skip_stdlib(tmp_path):
    script = "import json\nimport NotARealModule\nimport yaml\n"
    assert fingerprint(tmp_path, script).packages == ("notarealmodule", "pyyaml")


def test_distributions_agree_with_importlib_metadata(tmp_path):
    script = "import PIL\nimport torch\nimport yaml\nimport numpy\nimport safetensors\n"
    standard = importlib.metadata.packages_distributions()
    names = ("PIL", "torch", "yaml", "numpy", "safetensors")
    expected = {distribution.lower() for name in names for distribution in standard[name]}
    assert set(fingerprint(tmp_path, script).packages) == expected


def test_an_edit_in_place_is_seen_despite_the_parse_cache(tmp_path):
    entry, package = build(tmp_path)
    before = code_fingerprint(entry, package_dir=package)
    assert code_fingerprint(entry, package_dir=package) == before
    util = package / "util.py"
    util.write_text(util.read_text().replace("x * SCALE", "x * SCALE * 2"))
    after = code_fingerprint(entry, package_dir=package)
    assert after.placed["fakepkg.util:helper"] != before.placed["fakepkg.util:helper"]


def test_real_scripts_reach_their_libraries():
    resize = code_fingerprint(REPO / "scripts" / "resize.py")
    assert "pillow" in resize.packages
    assert "loramill.prepare.resize:resize_dataset" in resize.placed
    train = code_fingerprint(REPO / "scripts" / "train.py")
    assert {"torch", "diffusers", "peft", "accelerate", "safetensors"} <= set(train.packages)
    assert {"scripts/train.py", "loramill.train.loop:train_lora"} <= train.placed.keys()
    assert not [place for place in {**resize.placed, **train.placed} if runner.__name__ in place]
    assert list(train.placed) == sorted(train.placed)
    assert list(train.packages) == sorted(train.packages)


def test_the_tree_copy_the_hashes_rewrite_is_a_deep_copy():
    # The hashed trees are rewritten in place, and the parsed ones are shared by every
    # fingerprint of the process: the copy must be whole and independent (as deepcopy's).
    import ast
    import copy

    from loramill.reruns.code_modules import clone

    tree = ast.parse((REPO / "src" / "loramill" / "reruns" / "code.py").read_text())
    tree.body += ast.parse("global a, b\nx = {None: 1, **y}\n").body
    before = ast.dump(tree, include_attributes=True)
    copied = clone(tree)
    assert ast.dump(copied, include_attributes=True) == ast.dump(
        copy.deepcopy(tree), include_attributes=True
    )
    for node in ast.walk(copied):  # what the rewriting does, and more
        for name in ("name", "id", "attr"):
            if isinstance(getattr(node, name, None), str):
                setattr(node, name, "renamed")
        if isinstance(node, ast.Global):
            node.names.append("c")
        if not isinstance(node, ast.expr_context):  # shared, as the parser shares them
            node.lineno = 0
    assert ast.dump(tree, include_attributes=True) == before

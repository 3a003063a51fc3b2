"""The package's rooms: the README lists each, each says what it may import, and the imports
keep to that (no room imports one above it, so there is no circle to untangle later)."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import REPO

PACKAGE = REPO / "src" / "loramill"
CORE = "core"
# What each room may import besides itself, as its docstring says.
MAY_IMPORT = {
    CORE: set(),
    "reruns": {CORE},
    "models": {CORE},
    "demo": {CORE},
    "prepare": {CORE, "reruns"},
    "captions": {CORE, "models"},
    "train": {CORE, "models", "prepare", "captions"},
    "export": {CORE, "models", "train"},
    "grid": {CORE, "reruns", "models", "train", "export"},
    "text": {CORE, "models", "train"},
}
# The core modules that name functions of the rooms: the table of params fingerprinted by
# content, which the rerun machinery asks instead of knowing the stages, and the parse-time
# config checks, which ask each room's options.
WIRING = {"loramill.content_params": {CORE}, "loramill.workflow_config": {CORE}}


def rooms() -> set[str]:
    return {path.parent.name for path in PACKAGE.glob("*/__init__.py")}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else CORE


def imports() -> dict[str, set[str]]:
    """Every package module and the package modules it imports (in functions too)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("loramill", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loramill"):
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("loramill")}
        found[module] = targets
    return found


def test_the_readme_lists_every_room_on_one_line():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^    src/loramill/(\w+)/ +\S.*$", layout, re.M)
    assert sorted(listed) == sorted(rooms())
    assert set(MAY_IMPORT) == rooms() | {CORE}


@pytest.mark.parametrize("name", sorted(MAY_IMPORT.keys() - {CORE}))
def test_each_room_says_what_it_owns_and_may_import(name):
    docstring = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
    assert docstring and len(docstring) > 80, f"{name}/__init__.py: what does it own?"
    said = docstring.split("mport", 1)[-1]  # "Imports …" / "may import …"
    for other in MAY_IMPORT[name] - {CORE}:
        assert f"loramill.{other}" in said or f"``{other}``" in said, (name, other)


def test_imports_keep_to_the_rooms():
    wrong = []
    for module, targets in imports().items():
        allowed = {room(module), *MAY_IMPORT[room(module)], *WIRING.get(module, ())}
        if module in WIRING:
            continue  # the wiring table names what it wires, and nothing imports it back
        wrong += [f"{module} → {t}" for t in sorted(targets) if room(t) not in allowed]
    assert not wrong, wrong


def test_no_module_is_imported_back_by_what_it_imports():
    graph = imports()
    modules = set(graph)
    edges = {m: {t if t in modules else t.rpartition(".")[0] for t in ts} & modules - {m}
             for m, ts in graph.items()}  # fmt: skip
    done, on_path = set(), []

    def visit(module: str) -> None:
        if module in on_path:
            pytest.fail("import circle: " + " → ".join([*on_path, module]))
        if module in done:
            return
        on_path.append(module)
        for target in sorted(edges[module]):
            visit(target)
        on_path.pop()
        done.add(module)

    for module in sorted(modules):
        visit(module)

"""Python files as the code fingerprint reads them (loramill.reruns.code): parsed once per
file version, docstrings removed, with the names each module binds at its top level, the
imports behind them, and what it does at import time.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Iterator
from functools import cache, cached_property
from pathlib import Path

SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
IMPORTS = (ast.Import, ast.ImportFrom)
Import = ast.Import | ast.ImportFrom
# Assignments inside these bind their own scope's names, not the module's.
INNER = (*SCOPES, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
BODIES = ("body", "orelse", "finalbody", "handlers", "cases")
RECORD_TOP = re.compile(r"^(\w+)[/.,]", re.MULTILINE)  # "PIL/Image.py,sha256=…" → PIL


def walk_nodes(node: ast.AST, stop: tuple[type, ...] = ()) -> Iterator:
    """Nodes under ``node``, each before its children, not below a ``stop`` node.
    Hand-rolled: twice as fast as ``ast.walk``."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if current is node or not isinstance(current, stop):
            for name in current._fields:
                value = getattr(current, name, None)
                if isinstance(value, list):
                    todo.extend([child for child in value if isinstance(child, ast.AST)])
                elif isinstance(value, ast.AST):
                    todo.append(value)


def clone(node: ast.AST) -> ast.AST:
    """A copy of a parsed tree for a transformer to rewrite, as ``copy.deepcopy`` makes it
    but several times faster (its memo and reduce protocol were most of a cold code
    fingerprint). The load/store contexts stay shared: the parser shares them too, and
    nothing rewrites them."""
    if isinstance(node, ast.expr_context):
        return node
    copied = type(node)()
    for name, value in node.__dict__.items():
        if isinstance(value, ast.AST):
            value = clone(value)
        elif isinstance(value, list):  # of nodes, or of names (``global a, b``)
            value = [clone(item) if isinstance(item, ast.AST) else item for item in value]
        setattr(copied, name, value)
    return copied


def strip_docstrings(tree: ast.Module) -> ast.Module:
    todo: list[ast.AST] = [tree]
    while todo:  # statements only: expressions hold no docstrings, and are most of a tree
        node = todo.pop()
        if isinstance(node, (ast.Module, *SCOPES)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                node.body = node.body[1:] if isinstance(first.value.value, str) else node.body
        for name in BODIES:
            todo.extend(getattr(node, name, ()))
    return tree


def bound_name(statement: Import, alias: ast.alias) -> str:
    """The name an import binds: ``import a.b`` binds ``a``."""
    if alias.asname or isinstance(statement, ast.ImportFrom):
        return alias.asname or alias.name
    return alias.name.split(".")[0]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _nested(statement: ast.AST) -> Iterator[ast.AST]:
    """Statements inside a compound one (``if``, ``try``, ``with``, ``for``, ``match``),
    except the body of ``if __name__ == "__main__"``, which importing does not run."""
    if not (isinstance(statement, ast.If) and "__main__" in ast.dump(statement.test)):
        for name in BODIES:  # ``except`` and ``case`` clauses come back as compound ones
            yield from getattr(statement, name, ())


class ParsedModule:
    """One parsed file: its top-level bindings and what it does at import time."""

    def __init__(self, path: Path, name: str | None, package: str) -> None:
        self.name, self.package = name, package
        self.is_package = path.name == "__init__.py"
        self.tree = strip_docstrings(ast.parse(path.read_bytes(), filename=str(path)))
        self.bindings: dict[str, list[ast.stmt]] = {}
        self.star = False  # a star import binds names no one can see
        self.candidates: list[ast.stmt] = []
        for statement in self.tree.body:
            self._bind(statement)
        # Under postponed evaluation annotations are strings: they run no code.
        future = [s for s in self.tree.body if getattr(s, "module", "") == "__future__"]
        self.annotations = "annotations" not in {a.name for s in future for a in s.names}

    def _bind(self, statement: ast.AST) -> None:
        if isinstance(statement, SCOPES):
            names = [statement.name]
            self.candidates += [statement] if statement.decorator_list else []
        elif isinstance(statement, IMPORTS):
            self.star |= any(alias.name == "*" for alias in statement.names)
            names = [bound_name(statement, a) for a in statement.names if a.name != "*"]
        else:
            own = walk_nodes(statement, stop=(*INNER, ast.stmt))  # nested statements: below
            stored = [n for n in own if isinstance(getattr(n, "ctx", None), ast.Store)]
            names = [n.id for n in stored if isinstance(n, ast.Name)]
            if isinstance(statement, ast.Expr) or any(
                isinstance(n, (ast.Subscript, ast.Attribute)) for n in stored
            ):
                self.candidates.append(statement)  # a call, or a store into a container
            for child in _nested(statement):
                self._bind(child)
        for name in dict.fromkeys(names):
            self.bindings.setdefault(name, []).append(statement)

    @cached_property
    def fingerprinted(self) -> bool:
        """False where the module says ``__fingerprinted__ = False``: infrastructure that
        runs a stage's code without being part of what the stage computes."""
        for statement in self.bindings.get("__fingerprinted__", ()):
            value = getattr(statement, "value", None)
            if isinstance(value, ast.Constant) and value.value is False:
                return False
        return True

    def star_sources(self) -> list[str]:
        """The modules its star imports read from: they bind names no one can see."""
        return [
            self.source(s, a)
            for s in self.tree.body if isinstance(s, ast.ImportFrom)
            for a in s.names if a.name == "*"
        ]  # fmt: skip

    @cached_property
    def effects(self) -> list[ast.stmt]:
        """Statements that act at import time beyond binding a name: calls, stores into
        containers, and definitions decorated by the package itself, the registry pattern
        (``@register class X`` is reached through no name, yet the stage may run it)."""
        return [s for s in self.candidates if not isinstance(s, SCOPES) or self._registers(s)]

    def _registers(self, definition: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
        for decorator in definition.decorator_list:
            root = decorator.func if isinstance(decorator, ast.Call) else decorator
            while isinstance(root, ast.Attribute):
                root = root.value
            for statement in self.bindings.get(getattr(root, "id", ""), ()):
                if isinstance(statement, SCOPES) or any(
                    within(self.source(statement, alias), self.package)
                    for alias in getattr(statement, "names", ())
                ):
                    return True
        return False

    def source(self, statement: Import, alias: ast.alias) -> str:
        """Absolute module an import reads from ("" for a relative import outside a package)."""
        if isinstance(statement, ast.Import):
            return alias.name
        if not statement.level:
            return statement.module or ""
        if self.name is None:  # the entry script is in no package
            return ""
        parts = self.name.split(".")[: None if self.is_package else -1]
        base = parts[: len(parts) - statement.level + 1]
        return ".".join([*base, statement.module] if statement.module else base)


_PARSED: dict[tuple[str, str | None], tuple[tuple[int, int], ParsedModule]] = {}


def parse_module(path: Path, name: str | None, package: str) -> ParsedModule:
    """Parsed once per process and file version (mtime, size): a workflow fingerprints every
    stage at each parse, and the stages share most of their modules."""
    stat = path.stat()
    key, version = (str(path), name), (stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED or _PARSED[key][0] != version:
        _PARSED[key] = (version, ParsedModule(path, name, package))
    return _PARSED[key][1]


@cache
def distributions() -> dict[str, tuple[str, ...]]:
    """Import name → distribution names, inferred as ``importlib.metadata``'s
    ``packages_distributions`` does (``top_level.txt``, else the RECORD's top entries) but
    read straight from the ``*.dist-info`` folders: that function parses every RECORD through
    pathlib and costs some 0.2 s per process, ten times this."""
    found: dict[str, set[str]] = {}
    for folder in filter(os.path.isdir, dict.fromkeys(p or "." for p in sys.path)):
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, _, kind = entry.name.rpartition(".")
                if kind in ("dist-info", "egg-info") and entry.is_dir():
                    distribution = re.sub(r"[-_.]+", "-", stem.split("-")[0]).lower()
                    for name in _top_level(entry.path):
                        found.setdefault(name, set()).add(distribution)
    return {name: tuple(sorted(distributions)) for name, distributions in found.items()}


def _top_level(folder: str) -> list[str]:
    for listing in ("top_level.txt", "RECORD"):
        path = os.path.join(folder, listing)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            return text.split() if listing == "top_level.txt" else RECORD_TOP.findall(text)
    return []

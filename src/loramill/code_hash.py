"""Fingerprint of the Python code a workflow stage runs, definition by definition.

A stage's result must be recomputed when the code that computes it changes, and only then.
Hashing whole files over-reaches: a module imported for one constant would drag every
function in it into the key, and an edit to an unrelated helper would retrain a model. So the
fingerprint starts from the stage's ``script:`` file, follows the names it uses from
definition to definition across the package, and hashes each reached top-level definition.

Hashes are of the syntax tree (``ast.dump`` has no positions; docstrings are removed), so
comments, docstrings and formatting never count. Third-party code is not hashed: the
distributions the reached code imports are returned, for their versions to be tracked.

Where static resolution cannot see what a name is (a star import, a name set dynamically, a
module passed around as a value), the whole module counts: the fingerprint may over-count, it
must not miss code.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
IMPORTS = (ast.Import, ast.ImportFrom)
Import = ast.Import | ast.ImportFrom
# Assignments inside these bind their own scope's names, not the module's.
INNER = (*SCOPES, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
BODIES = ("body", "orelse", "finalbody", "handlers", "cases")
RECORD_TOP = re.compile(r"^(\w+)[/.,]", re.MULTILINE)  # "PIL/Image.py,sha256=…" → PIL


@dataclass(frozen=True)
class CodeFingerprint:
    parts: dict[str, str]  # "scripts/train.py" or "loramill.train:train_lora" → hash
    packages: tuple[str, ...]  # third-party distributions the reached code imports


def _walk(node: ast.AST, stop: tuple[type, ...] = (), annotations: bool = True) -> Iterator:
    """Nodes under ``node``, each before its children (``_references`` relies on it).
    Hand-rolled: twice as fast as ``ast.walk``, and it can leave annotations out."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if current is node or not isinstance(current, stop):
            for name in current._fields:
                if annotations or (name != "annotation" and name != "returns"):
                    value = getattr(current, name, None)
                    if isinstance(value, list):
                        todo.extend([child for child in value if isinstance(child, ast.AST)])
                    elif isinstance(value, ast.AST):
                        todo.append(value)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
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


# Keyed on the nodes themselves (AST nodes hash by identity): a parsed file's nodes are
# reused for as long as the file is unchanged.
@lru_cache(maxsize=1 << 12)
def _digest(nodes: tuple[ast.AST, ...]) -> str:
    return hashlib.sha256("\n".join(ast.dump(node) for node in nodes).encode()).hexdigest()


def normalized_source_hash(source: str) -> str:
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()  # same as _digest, uncached


def _bound(statement: Import, alias: ast.alias) -> str:
    """The name an import binds: ``import a.b`` binds ``a``."""
    if alias.asname or isinstance(statement, ast.ImportFrom):
        return alias.asname or alias.name
    return alias.name.split(".")[0]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _nested(statement: ast.AST) -> Iterator[ast.AST]:
    """Statements inside a compound one (``if``, ``try``, ``with``, ``for``, ``match``),
    except the body of ``if __name__ == "__main__"``, which importing does not run."""
    if not (isinstance(statement, ast.If) and "__main__" in ast.dump(statement.test)):
        for name in BODIES:  # ``except`` and ``case`` clauses come back as compound ones
            yield from getattr(statement, name, ())


@dataclass
class _Refs:
    """What a piece of code reads: names, ``name.a.b`` paths, and its own imports."""

    names: list[str] = field(default_factory=list)
    chains: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)
    bare: set[str] = field(default_factory=set)  # read other than as ``name.attr``
    imports: list[tuple[Import, ast.alias]] = field(default_factory=list)


@lru_cache(maxsize=1 << 12)
def _references(node: ast.AST, annotations: bool) -> _Refs:
    refs, names, inner = _Refs(), set(), set()
    for child in _walk(node, annotations=annotations):
        if isinstance(child, IMPORTS):
            refs.imports.extend((child, alias) for alias in child.names)
        elif isinstance(child, ast.Attribute) and id(child) not in inner:
            path, value = [], child
            while isinstance(value, ast.Attribute):
                path.append(value.attr)
                value = value.value
                inner.add(id(value))  # visited later as part of this longest path
            if isinstance(value, ast.Name):
                refs.chains.setdefault(value.id, set()).add(tuple(reversed(path)))
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
            names.add(child.id)
            if id(child) not in inner:
                refs.bare.add(child.id)
    refs.names = sorted(names)
    return refs


class _Module:
    """One parsed file: its top-level bindings and what it does at import time."""

    def __init__(self, path: Path, name: str | None, package: str) -> None:
        self.name, self.package = name, package
        self.is_package = path.name == "__init__.py"
        self.tree = _strip_docstrings(ast.parse(path.read_bytes(), filename=str(path)))
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
            names = [_bound(statement, a) for a in statement.names if a.name != "*"]
        else:
            own = _walk(statement, stop=(*INNER, ast.stmt))  # nested statements: below
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
                    _within(self.source(statement, alias), self.package)
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


_PARSED: dict[tuple[str, str | None], tuple[tuple[int, int], _Module]] = {}


def _parse(path: Path, name: str | None, package: str) -> _Module:
    """Parsed once per process and file version (mtime, size): a workflow fingerprints every
    stage at each parse, and the stages share most of their modules."""
    stat = path.stat()
    key, version = (str(path), name), (stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED or _PARSED[key][0] != version:
        _PARSED[key] = (version, _Module(path, name, package))
    return _PARSED[key][1]


@cache
def _distributions() -> dict[str, tuple[str, ...]]:
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


class _Walk:
    """One fingerprint: a work list of ``(module, name)`` to reach, ``name`` None for all."""

    def __init__(self, package_dir: Path, skip: frozenset[str]) -> None:
        self.package_dir, self.package, self.skip = package_dir, package_dir.name, skip
        self.parts: dict[str, str] = {}
        self.packages: set[str] = set()
        self.done: set[str] = set()  # "module:name" reached, and modules entered or whole
        self.todo: list[tuple[str, str | None]] = []
        self.modules: dict[str, _Module | None] = {}
        self.paths: dict[str, Path | None] = {}

    def run(self, script: Path) -> CodeFingerprint:
        entry = _parse(script, None, self.package)
        self.parts[f"{script.parent.name}/{script.name}"] = _digest((entry.tree,))
        self._unit(entry, entry.tree)
        while self.todo:
            module, name = self.todo.pop()
            if name is None:
                self._whole(module)
            else:
                self._symbol(module, name)
        # A module counted whole needs none of its definitions listed on their own.
        parts = {
            key: value
            for key, value in self.parts.items()
            if key.endswith(":*") or f"{key.partition(':')[0]}:*" not in self.parts
        }
        return CodeFingerprint(dict(sorted(parts.items())), tuple(sorted(self.packages)))

    def _path(self, module: str) -> Path | None:
        """The file of the package's module of that name, None where there is none."""
        if module not in self.paths:
            base = self.package_dir.joinpath(*module.split(".")[1:])
            paths = (base / "__init__.py", base.with_name(base.name + ".py"))
            self.paths[module] = next((path for path in paths if path.is_file()), None)
        return self.paths[module]

    def _load(self, module: str) -> _Module | None:
        if module not in self.modules:
            path = self._path(module)
            skipped = any(_within(module, skipped) for skipped in self.skip)
            self.modules[module] = (
                _parse(path, module, self.package) if path and not skipped else None
            )
        return self.modules[module]

    def _whole(self, module: str) -> None:
        parsed = self._load(module)
        if parsed and f"{module}:*" not in self.parts:
            self.parts[f"{module}:*"] = _digest((parsed.tree,))
            self._unit(parsed, parsed.tree)

    def _symbol(self, module: str, name: str) -> None:
        key, parsed = f"{module}:{name}", self._load(module)
        if not parsed or key in self.done or f"{module}:*" in self.parts:
            return
        self.done.add(key)
        self._enter(module)
        statements = parsed.bindings.get(name)
        if parsed.star or not statements:
            self.todo.append((module, None))  # cannot see where it comes from: all of it
            return
        if own := tuple(s for s in statements if not isinstance(s, IMPORTS)):
            self.parts[key] = _digest(own)
        for statement in statements:
            if isinstance(statement, IMPORTS):
                # Re-exported: a module alias handed on is used in ways not seen here.
                self._resolve(parsed, statement, name, _Refs(bare={name}))
            else:
                self._unit(parsed, statement)

    def _enter(self, module: str) -> None:
        """Importing a module, and the packages above it, runs their import-time effects."""
        parents = module.split(".")
        for name in (".".join(parents[:depth]) for depth in range(1, len(parents) + 1)):
            parsed = self._load(name)
            if parsed is None or name in self.done:
                continue
            self.done.add(name)
            for index, statement in enumerate(parsed.effects):
                if isinstance(statement, SCOPES):
                    self.todo.append((name, statement.name))
                else:
                    self.parts[f"{name}:<effect {index}>"] = _digest((statement,))
                    self._unit(parsed, statement)

    def _unit(self, parsed: _Module, node: ast.AST) -> None:
        """Follow what a reached definition (or a whole module) reads."""
        refs = _references(node, parsed.annotations)
        for statement, alias in refs.imports:  # imports inside a function run with it
            self._import(parsed, statement, alias, refs)
        if isinstance(node, ast.Module):
            return  # every name it binds is in its own digest or imported just above
        if "globals" in refs.names and parsed.name:
            self.todo.append((parsed.name, None))  # reads module names by string
        local = {_bound(statement, alias) for statement, alias in refs.imports}
        for name in refs.names:
            for statement in [] if name in local else parsed.bindings.get(name, ()):
                if isinstance(statement, IMPORTS):
                    self._resolve(parsed, statement, name, refs)
                elif parsed.name:
                    self.todo.append((parsed.name, name))

    def _resolve(self, parsed: _Module, statement: Import, name: str, refs: _Refs) -> None:
        for alias in statement.names:
            if _bound(statement, alias) == name:
                self._import(parsed, statement, alias, refs)

    def _import(self, parsed: _Module, statement: Import, alias: ast.alias, refs: _Refs) -> None:
        source = parsed.source(statement, alias)
        submodule = f"{source}.{alias.name}"
        if not _within(source, self.package):
            top = source.split(".")[0]
            if top and top not in sys.stdlib_module_names:
                self.packages.update(_distributions().get(top, (top.lower(),)))
        elif isinstance(statement, ast.Import):
            bound = _bound(statement, alias)
            self._module_use(source if alias.asname else self.package, bound, refs)
        elif alias.name == "*":
            self.todo.append((source, None))
        elif self._path(submodule) or submodule in self.skip:
            self._module_use(submodule, alias.asname or alias.name, refs)
        else:
            self.todo.append((source, alias.name))

    def _module_use(self, module: str, bound: str, refs: _Refs) -> None:
        """``bound`` names ``module``: reach what its attribute paths name."""
        if bound in refs.bare:
            self.todo.append((module, None))
        for chain in sorted(refs.chains.get(bound, ())):
            current = module
            for attribute in chain:
                if self._path(f"{current}.{attribute}") is None:
                    self.todo.append((current, attribute))
                    break
                current = f"{current}.{attribute}"
            else:
                self.todo.append((current, None))


def code_fingerprint(
    script: str | os.PathLike,
    skip: frozenset[str] = frozenset({"loramill.job"}),
    *,
    package_dir: str | os.PathLike = PACKAGE_DIR,
) -> CodeFingerprint:
    """The code ``script`` runs: the script whole, and every package definition it reaches.

    Modules in ``skip`` are not followed: the job runner calls the stage's function and
    records locks, which is infrastructure, not what the job computes. ``package_dir`` is
    the package followed (its folder name is the import name); other imports are packages.
    """
    return _Walk(Path(package_dir).resolve(), skip).run(Path(script).resolve())

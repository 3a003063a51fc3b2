"""Fingerprint of the Python code a workflow stage runs, definition by definition.

A stage's result must be recomputed when the code that computes it changes, and only then.
Hashing whole files over-reaches: a module imported for one constant would drag every
function in it into the key, and an edit to an unrelated helper would retrain a model. So the
fingerprint starts from the stage's ``script:`` file, follows the names it uses from
definition to definition across the package, and hashes each reached top-level definition.

Hashes are of the syntax tree (no positions; docstrings removed), so comments, docstrings and
formatting never count. Nor does where code lives or what it is called: each reached
definition gets a key by the order in which the code reaches it, and inside every hashed tree
a name that stands for a package definition (an import of it included) is replaced by that
key. Moving a module into a subpackage, or renaming a function together with its callers,
leaves every part as it was; changing what runs changes a part. Where the code lives is kept
beside the parts (``where``) for messages only.

Third-party code is not hashed: the distributions the reached code imports are returned, for
their versions to be tracked. Where static resolution cannot see what a name is (a star
import, a name set dynamically, a module passed around as a value), the whole module counts:
the fingerprint may over-count, it must not miss code.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from loramill.reruns.code_modules import (
    IMPORTS,
    SCOPES,
    Import,
    ParsedModule,
    bound_name,
    clone,
    distributions,
    parse_module,
    within,
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
WHOLE = None  # a target's name for "the whole module"
MODULE = ""  # a target's name for "the module object itself" (``from pkg import module``)
Target = tuple[str, str | None]


@dataclass(frozen=True)
class CodeFingerprint:
    """Equal when the same code runs: where it lives and which files hold it do not count."""

    parts: dict[str, str]  # key ("script", "1", "2" … in the order reached) → hash
    packages: tuple[str, ...]  # third-party distributions the reached code imports
    where: dict[str, str] = field(compare=False)  # key → "loramill.train.loop:train_lora"
    files: tuple[str, ...] = field(compare=False)  # every file read or looked for

    @property
    def placed(self) -> dict[str, str]:
        """The parts by where their code lives, for messages and tests."""
        return dict(sorted((self.where[key], digest) for key, digest in self.parts.items()))


class _Walk:
    """One fingerprint: definitions reached, keyed in order, each hashed once."""

    def __init__(self, package_dir: Path) -> None:
        self.package_dir, self.package = package_dir, package_dir.name
        self.keys: dict[Target, str] = {}
        self.queue: deque[Target] = deque()
        self.parts: dict[str, str] = {}
        self.where: dict[str, str] = {}
        self.packages: set[str] = set()
        self.entered: set[str] = set()
        self.modules: dict[str, ParsedModule | None] = {}
        self.paths: dict[str, Path | None] = {}

    def run(self, script: Path) -> CodeFingerprint:
        entry = parse_module(script, None, self.package)
        self.parts["script"] = self._hash(entry, list(entry.tree.body), whole=True)
        self.where["script"] = f"{script.parent.name}/{script.name}"
        while self.queue:
            self._reach(self.queue.popleft())
        # A module counted whole needs none of its definitions listed on their own.
        whole = {module for (module, name) in self.keys if name is WHOLE}
        parts = {
            key: digest
            for key, digest in self.parts.items()
            if key == "script"
            or self.where[key].partition(":")[0] not in whole
            or self.where[key].endswith(":*")
        }
        # Files that are not there count too: one appearing can change what a name means.
        looked = {str(script)}
        for module, path in self.paths.items():
            looked.update([str(path)] if path else map(str, self._candidates(module)))
        where = {key: self.where[key] for key in parts}
        return CodeFingerprint(parts, tuple(sorted(self.packages)), where, tuple(sorted(looked)))

    # ---- where things are ------------------------------------------------------------

    def _candidates(self, module: str) -> tuple[Path, Path]:
        base = self.package_dir.joinpath(*module.split(".")[1:])
        return base / "__init__.py", base.with_name(base.name + ".py")

    def _path(self, module: str) -> Path | None:
        """The file of the package's module of that name, None where there is none."""
        if not within(module, self.package):
            return None
        if module not in self.paths:
            found = (path for path in self._candidates(module) if path.is_file())
            self.paths[module] = next(found, None)
        return self.paths[module]

    def _load(self, module: str) -> ParsedModule | None:
        return None if self._skipped(module) else self._parsed(module)

    def _parsed(self, module: str) -> ParsedModule | None:
        if module not in self.modules:
            path = self._path(module)
            self.modules[module] = parse_module(path, module, self.package) if path else None
        return self.modules[module]

    def _skipped(self, module: str) -> bool:
        """Not followed: a module declaring ``__fingerprinted__ = False``."""
        parsed = self._parsed(module)
        return parsed is not None and not parsed.fingerprinted

    # ---- keys --------------------------------------------------------------------------

    def key(self, target: Target) -> str:
        """The key of a definition (``(module, name)``) or whole module (``(module, None)``);
        the first use queues it for hashing."""
        module, name = target
        if name == MODULE:
            target = (module, WHOLE)  # a module used as a value: all of it may run
        if self._skipped(module):
            return f"skipped:{name or ''}"  # infrastructure: by name, not followed
        if target not in self.keys:
            self.keys[target] = str(len(self.keys) + 1)
            self.queue.append(target)
        return self.keys[target]

    def _reach(self, target: Target) -> None:
        module, name = target
        parsed, key = self._load(module), self.keys[target]
        self.where[key] = f"{module}:{'*' if name is WHOLE else name}"
        if parsed is None:
            self.parts[key] = "absent"
            return
        self._enter(module)
        if name is WHOLE:
            self.parts[key] = self._hash(parsed, list(parsed.tree.body), whole=True)
            return
        statements = parsed.bindings.get(name, [])
        self.parts[key] = self._hash(parsed, statements, whole=False)

    def _enter(self, module: str) -> None:
        """Importing a module, and the packages above it, runs their import-time effects."""
        parents = module.split(".")
        for name in (".".join(parents[:depth]) for depth in range(1, len(parents) + 1)):
            parsed = self._load(name)
            if parsed is None or name in self.entered:
                continue
            self.entered.add(name)
            for source in parsed.star_sources():
                self.key((source, WHOLE))
            for index, statement in enumerate(parsed.effects):
                if isinstance(statement, SCOPES):
                    self.key((name, statement.name))
                    continue
                # Keyed like a definition, by order: a moved module keeps its effects' keys.
                key = self.keys.setdefault((name, f"<effect {index}>"), str(len(self.keys) + 1))
                self.where[key] = f"{name}:<effect {index}>"
                self.parts[key] = self._hash(parsed, [statement], whole=False)

    # ---- resolving names -----------------------------------------------------------------

    def resolve(self, parsed: ParsedModule, name: str) -> Target | None:
        """What a module-level ``name`` of ``parsed`` stands for in the package, None for
        a third-party or unknown name (a distribution is noted)."""
        statements = parsed.bindings.get(name)
        if not statements:
            return None
        imports = [s for s in statements if isinstance(s, IMPORTS)]
        if len(imports) == 1 and len(statements) == 1:
            alias = next(a for a in imports[0].names if bound_name(imports[0], a) == name)
            return self.imported(parsed, imports[0], alias)
        return (parsed.name, name) if parsed.name else None

    def imported(self, parsed: ParsedModule, statement: Import, alias: ast.alias) -> Target | None:
        """What an import binds: a package definition, module or module as a whole."""
        source = parsed.source(statement, alias)
        if not within(source, self.package):
            top = source.split(".")[0]
            if top and top not in sys.stdlib_module_names:
                self.packages.update(distributions().get(top, (top.lower(),)))
            return None
        if isinstance(statement, ast.Import):  # ``import pkg.a.b`` binds pkg
            return (source if alias.asname else self.package, MODULE)
        if alias.name == "*":
            return (source, WHOLE)
        submodule = f"{source}.{alias.name}"
        if self._path(submodule) or self._skipped(submodule):
            return (submodule, MODULE)
        return self.definition(source, alias.name)

    def definition(self, module: str, name: str) -> Target:
        """Where ``module.name`` is defined, following re-exports."""
        parsed = self._load(module)
        statements = parsed.bindings.get(name) if parsed else [None]
        if not statements:
            return (module, WHOLE)  # a star import or a dynamic name: cannot see which
        if len(statements) == 1 and isinstance(statements[0], IMPORTS):
            statement = statements[0]
            alias = next(a for a in statement.names if bound_name(statement, a) == name)
            return self.imported(parsed, statement, alias) or (module, name)
        return (module, name)

    def attribute(self, target: Target, chain: list[str]) -> tuple[str, list[str]]:
        """The key ``module.a.b…`` reaches, and the attributes left over after it."""
        module = target[0]
        for index, attribute in enumerate(chain):
            if self._path(f"{module}.{attribute}") is None and not self._skipped(
                f"{module}.{attribute}"
            ):
                return self.key(self.definition(module, attribute)), chain[index + 1 :]
            module = f"{module}.{attribute}"
        return self.key((module, MODULE)), []

    def _hash(self, parsed: ParsedModule, statements: list[ast.stmt], whole: bool) -> str:
        tree = ast.Module(body=[clone(s) for s in statements], type_ignores=[])
        normalised = _Normalise(self, parsed, whole).visit(tree)
        return hashlib.sha256(ast.dump(normalised).encode()).hexdigest()


class _Normalise(ast.NodeTransformer):
    """A reached tree with every name of a package definition replaced by its key, visited
    in source order (keys are handed out in that order)."""

    def __init__(self, walk: _Walk, parsed: ParsedModule, whole: bool) -> None:
        self.walk, self.parsed, self.whole = walk, parsed, whole
        self.local: dict[str, Target | None] = {}  # names bound by imports inside functions
        self.top: set[int] = set()  # the hashed statements themselves (their names are keys)

    def visit_Module(self, node: ast.Module) -> ast.AST:
        self.top = {id(statement) for statement in node.body}
        return self.generic_visit(node)

    def target(self, name: str) -> Target | None:
        if name in self.local:
            return self.local[name]
        if (
            self.whole
            and name in self.parsed.bindings
            and not any(isinstance(s, IMPORTS) for s in self.parsed.bindings[name])
        ):
            return None  # the module's own definitions are in this very hash
        return self.walk.resolve(self.parsed, name)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "globals" and self.parsed.name:
            self.walk.key((self.parsed.name, WHOLE))  # reads module names by string
        target = self.target(node.id)
        if target is None:
            return node
        if not isinstance(node.ctx, ast.Load) and target not in self.walk.keys:
            return node  # a local variable that shares a module-level name: not a use
        return ast.Name(id=self.walk.key(target), ctx=node.ctx)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        chain, root = [], node
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        target = self.target(root.id) if isinstance(root, ast.Name) else None
        if target is None or target[1] != MODULE:
            return self.generic_visit(node)
        key, rest = self.walk.attribute(target, chain)
        result: ast.expr = ast.Name(id=key, ctx=ast.Load())
        for attribute in rest:
            result = ast.Attribute(value=result, attr=attribute, ctx=ast.Load())
        return result

    def _import(self, node: Import) -> ast.AST:
        imported = self.walk.imported
        targets = [(bound_name(node, a), imported(self.parsed, node, a)) for a in node.names]
        if all(target is None for _, target in targets):
            return node  # third-party or standard library: its name is what it is
        for name, target in targets:
            self.local[name] = target
        # What is used of an imported module is keyed where it is used (``module.name``).
        keys = [
            ast.unparse(node) if t is None else "<module>" if t[1] == MODULE else self.walk.key(t)
            for _, t in targets
        ]
        return ast.Import(names=[ast.alias(name=key) for key in keys])

    visit_Import = visit_ImportFrom = _import

    def _scope(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> ast.AST:
        top = id(node) in self.top and not self.whole
        target = self.walk.resolve(self.parsed, node.name) if top else None
        node.name = self.walk.key(target) if target else node.name
        if not self.parsed.annotations:  # postponed: annotations are strings, run nothing
            for argument in ast.walk(node.args) if not isinstance(node, ast.ClassDef) else ():
                if isinstance(argument, ast.arg):
                    argument.annotation = None
            if not isinstance(node, ast.ClassDef):
                node.returns = None
        return self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if not self.parsed.annotations:
            node.annotation = ast.Constant(value=ast.unparse(node.annotation))
        return self.generic_visit(node)


def code_fingerprint(
    script: str | os.PathLike,
    *,
    package_dir: str | os.PathLike = PACKAGE_DIR,
) -> CodeFingerprint:
    """The code ``script`` runs: the script whole, and every package definition it reaches.

    Modules that declare ``__fingerprinted__ = False`` are not followed: the job runner
    calls the stage's function and records locks, which is infrastructure, not what the job
    computes (the declaration moves with the module, so no rename can undo it).
    ``package_dir`` is the package followed (its folder name is the import name); other
    imports are packages.
    """
    return _Walk(Path(package_dir).resolve()).run(Path(script).resolve())

"""``python -m loramill`` lists every command the package has, each answers ``--help``, and
``make help`` describes every phony target."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loramill.__main__ import COMMANDS, INTERNAL

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "loramill"


def runnable_modules() -> tuple[set[str], set[str]]:
    """Modules of the package with a top-level ``main``, and those with a ``__main__`` block
    (read from the source, so a module added tomorrow is found)."""
    with_main, runnable = set(), set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                with_main.add(module)
            if isinstance(node, ast.If) and "__main__" in ast.dump(node.test):
                runnable.add(module)
    return with_main, runnable


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], []])
def test_python_m_loramill_lists_every_command(args):
    result = run(sys.executable, "-m", "loramill", *args)
    assert result.returncode == 0, result.stderr
    with_main, runnable = runnable_modules()
    assert with_main, "no command found: the scan is broken"
    for module in sorted(with_main):
        line = next((ln for ln in result.stdout.splitlines() if f"loramill.{module} " in ln), "")
        assert line, f"python -m loramill.{module} is not listed"
        assert len(line.split("  ")[-1].strip()) > 10, f"no description: {line!r}"
    # every other runnable module is accounted for as one users do not run
    assert runnable - with_main <= set(INTERNAL)
    for start in ("demo", "test"):
        assert re.search(rf"^  make {start} +\S", result.stdout, re.M), f"make {start}"


def test_unknown_command_says_what_there_is():
    result = run(sys.executable, "-m", "loramill", "publsh")
    assert result.returncode == 2
    assert "unknown command 'publsh'" in result.stderr and "loramill.publish" in result.stderr


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_each_listed_command_answers_help(module):
    result = run(sys.executable, "-m", f"loramill.{module}", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def documented_modules() -> set[str]:
    """Every ``python -m loramill…`` module the Makefile, README and docs tell people to run."""
    texts = [ROOT / "Makefile", ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    found = set()
    for path in texts:
        found.update(re.findall(r"python -m (loramill[\w.]*)", path.read_text(encoding="utf-8")))
    return {module.rstrip(".") for module in found}


def test_every_documented_entry_point_runs():
    documented = documented_modules()
    assert {"loramill.publish", "loramill.reruns.run_cache"} <= documented, "the scan is broken"
    for module in sorted(documented):
        result = run(sys.executable, "-m", module, "--help")
        assert result.returncode == 0, f"python -m {module} --help: {result.stderr[-500:]}"
        assert result.stdout.startswith(("usage:", "loramill:")), module


def test_make_help_describes_every_phony_target():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)[1].split()
    result = run("make", "--no-print-directory", "help")
    assert result.returncode == 0, result.stderr
    described = dict(
        re.match(r"  make (\S+) +(.+)$", line).groups() for line in result.stdout.splitlines()
    )
    assert sorted(described) == sorted(phony)
    assert all(len(text) > 10 for text in described.values()), described

"""Style gates from the brief: ruff, snakefmt and snakemake --lint are clean."""

from __future__ import annotations

import pytest
from conftest import REPO, run_tool


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("snakefmt", "--check", ".")],
    ids=lambda c: " ".join(c),
)
def test_clean(command):
    result = run_tool(*command, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_is_clean(demo_run):
    # On the demo checkout: parsing needs the pulled datasets, which a fresh clone lacks.
    result = run_tool("snakemake", "--lint", cwd=demo_run, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr

"""Style gates from the brief: ruff, snakefmt and snakemake --lint are clean."""

from __future__ import annotations

import pytest
from conftest import REPO, run_tool


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("snakefmt", "--check", "."),
        ("snakemake", "--lint"),
    ],
    ids=lambda c: " ".join(c),
)
def test_clean(command):
    result = run_tool(*command, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

"""A stage's outputs have one source, its rule (rules/*.smk): the Snakefile's header, the
README's table of what each stage writes and the published artifacts (loramill.publish) are
checked against the rules as Snakemake parses them, so an output added to a rule without
them fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from snakemake.settings import types
from workflow_plans import parsed

from loramill.publish import ARTIFACTS
from loramill.reruns.gates import done_marker

REPO = Path(__file__).resolve().parent.parent


def parsed_stage_outputs(root: Path, config: dict) -> dict[str, dict]:
    """Every output of every stage rule (those with a gate), done markers aside, as Snakemake
    parses the workflow (in this process; what parsing adds to it is undone)."""
    resources, settings = types.ResourceSettings(cores=1), types.ConfigSettings(config=config)
    with parsed(root, resources, settings) as (_, workflow_api):
        workflow = workflow_api._workflow
        stages = workflow.globals["STAGE_RULES"]
        found = {}
        for rule in workflow.rules:
            task = next((t for t, names in stages.items() if rule.name in names), None)
            if task is None:
                continue
            # {ds,a|b}: the wildcard constraint Snakemake adds; the documents write {ds}
            paths = [
                (re.sub(r"{(\w+),[^}]*}", r"{\1}", str(f)), f.is_directory) for f in rule.output
            ]
            marker = done_marker("{ds}", rule.name)
            found[rule.name] = {"task": task, "outputs": [p for p in paths if p[0] != marker]}
    return found


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory) -> dict[str, dict]:
    """rule → {"task": image|text, "outputs": [(pattern, is a folder)]}, from the workflow.

    The demo config's datasets are pointed at empty stand-ins (the workflow refuses a dataset
    whose data is not pulled); nothing runs."""
    data = tmp_path_factory.mktemp("data")
    (data / "images").mkdir()
    (data / "train.jsonl").touch()
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config = {"datasets": {ds: {"path": str(data)} for ds in demo["datasets"]}}
    # as JSON would give them: lists, not the tuples the workflow may have left in place
    found = json.loads(json.dumps(parsed_stage_outputs(REPO, config)))
    assert {"train", "export", "grid", "text_export"} <= found.keys()
    return found


def documented(pattern: str, is_directory: bool) -> str:
    """How the documents write an output: ``<ds>`` for the wildcard, a folder with its ``/``."""
    return pattern.replace("{ds}", "<ds>") + ("/" if is_directory else "")


def mentions(text: str, path: str) -> bool:
    """Whether ``text`` names ``path`` as a whole path: a folder may be followed by what it
    holds (``results/<ds>/resized/*.png``), a file by nothing longer."""
    end = "" if path.endswith("/") else r"(?=[\s`,;:)]|$)"
    return re.search(r"(?:^|[\s`(])" + re.escape(path) + end, text, re.MULTILINE) is not None


def snakefile_header() -> str:
    lines = (REPO / "Snakefile").read_text(encoding="utf-8").splitlines()
    return "\n".join(
        line
        for line in lines[: next(i for i, s in enumerate(lines) if s and not s.startswith("#"))]
    )


def readme_rows() -> dict[str, str]:
    """rule → its row of the README's table of what each stage writes."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## What each stage writes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[1]):
            rows[cells[1].strip("`")] = "|".join(cells[2:])
    return rows


def test_every_stage_output_is_in_the_snakefile_header(stage_outputs):
    header = snakefile_header()
    missing = [
        (rule, path)
        for rule, stage in stage_outputs.items()
        for path in (documented(*output) for output in stage["outputs"])
        if not mentions(header, path)
    ]
    assert not missing, f"outputs the Snakefile's header does not list: {missing}"


def test_every_stage_output_is_in_its_readme_row(stage_outputs):
    rows = readme_rows()
    assert not stage_outputs.keys() - rows.keys(), "stage rules without a README table row"
    missing = [
        (rule, path)
        for rule, stage in stage_outputs.items()
        for path in (documented(*output) for output in stage["outputs"])
        if not mentions(rows[rule], path)
    ]
    assert not missing, f"outputs the README's table does not list in their rule's row: {missing}"


def test_published_artifacts_are_stage_outputs(stage_outputs):
    for task, artifacts in ARTIFACTS.items():
        outputs = {
            pattern
            for stage in stage_outputs.values()
            if stage["task"] == task
            for pattern, _ in stage["outputs"]
        }
        assert set(artifacts) <= outputs, (task, sorted(set(artifacts) - outputs))


def test_an_undocumented_output_is_caught():
    """The checks themselves: a path only mentioned as part of a longer one does not count."""
    assert mentions("   results/<ds>/loss.png    loss curve", "results/<ds>/loss.png")
    assert not mentions("results/<ds>/loss.png.bak", "results/<ds>/loss.png")
    assert not mentions("exports/<ds>.diffusers.safetensors", "<ds>.safetensors")
    assert mentions("`results/<ds>/resized/*.png`", "results/<ds>/resized/")
    assert not mentions("`results/<ds>/resized`", "results/<ds>/resized/")

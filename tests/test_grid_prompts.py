"""A grid that sets no prompts shows the dataset's own training captions; one that sets them
keeps them, and only the former reads (and is rerun by) the captions. A real run drawing such a
grid: test_workflow.test_linked_dataset_trains_and_its_grid_shows_its_own_captions."""

from __future__ import annotations

import logging

import pytest
import yaml
from test_config_errors import workdir  # noqa: F401 (a fixture)
from workflow_plans import planned_jobs

from loramill import LoramillError
from loramill.files import write_jsonl
from loramill.grid.build import with_caption_prompts

SETTINGS = {"x": "checkpoint", "y": "strength", "z": "prompt", "prompts": []}
CAPTIONS = [
    {"image": "a.png", "caption": "zzt, a red disc", "source": "auto"},
    {"image": "b.png", "caption": "zzt, a red disc", "source": "auto"},
    {"image": "c.png", "caption": "zzt, a navy square", "source": "human"},
    {"image": "d.png", "caption": "zzt, a green band", "source": "auto"},
]


def test_no_prompts_means_the_first_distinct_captions_as_trained(tmp_path, caplog):
    path = tmp_path / "captions.jsonl"
    write_jsonl(path, CAPTIONS)
    with caplog.at_level(logging.INFO, logger="loramill"):
        settings = with_caption_prompts(SETTINGS, [path], "ds")
    assert settings["prompts"] == ["zzt, a red disc", "zzt, a navy square"]
    assert "grid ds: no grid.prompts set; prompts from its captions" in caplog.text
    one = with_caption_prompts({**SETTINGS, "z": "none"}, [path], "ds")
    assert one["prompts"] == ["zzt, a red disc"]


def test_set_prompts_are_kept_and_no_captions_read():
    chosen = {**SETTINGS, "prompts": ["zzt, a portrait"]}
    assert with_caption_prompts(chosen, []) == chosen
    with pytest.raises(LoramillError, match=r"^grid\.prompts: none set and no training captions"):
        with_caption_prompts(SETTINGS, [])


def test_only_a_grid_without_prompts_reads_the_captions(workdir, tmp_path):  # noqa: F811
    """The captions are an input of wide_bands' grid (prompts unset) and not of
    paper_stripes' (prompts set): a caption edit can never rerun a grid with set prompts."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"datasets": {"wide_bands": {"grid": {"prompts": []}}}}))
    _, jobs = planned_jobs(workdir, configfiles=[extra])
    inputs = {job.ds: job.inputs for job in jobs if job.rule == "grid"}
    assert "results/wide_bands/captions.jsonl" in inputs["wide_bands"]
    assert not [path for path in inputs["paper_stripes"] if "captions.jsonl" in path]

"""Text datasets on the language-model families users fine-tune (issue #33), through the whole
text chain in one project (text_prepare → text_train → text_export → text_evaluate): a
Mistral, a Qwen3 and a Gemma 2 dataset on tiny models of their own architectures
(loramill.demo.tiny_families), and the reruns a user relies on: none when nothing changed,
that dataset's chain alone when one of its records changed."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
from conftest import clone_checkout, edit_config, run_tool, small
from workflow_plans import plan

pytestmark = [pytest.mark.workflow]

FAMILIES = ("mistral", "qwen3", "gemma2")
CHAIN = ("text_prepare", "text_train", "text_export", "text_evaluate")


def dataset(family: str) -> str:
    return f"procedures_{family}"


def text_families(config):
    small(config)
    config["datasets"] = {
        dataset(f): {"task": "text", "base_model": f"models/tiny-{f}"} for f in FAMILIES
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from loramill.demo.tiny_families import write_family_model

    root = clone_checkout(tmp_path_factory.mktemp("text-families") / "loramill")
    run_tool("dvc", "pull", "data/station_procedures", cwd=root)
    records = root / "data" / "station_procedures" / "train.jsonl"
    texts = [json.loads(line)["prompt"] for line in records.read_text().splitlines()]
    for family in FAMILIES:
        shutil.copytree(records.parent, root / "data" / dataset(family))
        write_family_model(family, root / "models" / f"tiny-{family}", texts)
    edit_config(root, text_families)
    result = run_tool("snakemake", "--cores", "2", "train_all", cwd=root)
    return root, result


def test_each_family_trains_evaluates_and_exports(built):
    root, result = built
    for family in FAMILIES:
        ds = dataset(family)
        assert f"wildcards: ds={ds}" in result.stderr
        folder = root / "exports" / ds
        assert (folder / "adapter_model.safetensors").is_file()
        evaluation = json.loads((root / "evaluations" / f"{ds}.json").read_text())
        # the base (step 0) and each checkpoint, each with its eval loss
        assert [row["step"] for row in evaluation["rows"]] == [0, 2, 4], ds
        assert all(row["eval_loss"] > 0 for row in evaluation["rows"]), ds
        arch = gguf.GGUFReader(folder / f"{ds}.gguf").fields["general.architecture"].contents()
        assert arch == {"mistral": "llama", "qwen3": "qwen3", "gemma2": "gemma2"}[family]


def test_a_second_run_plans_nothing_and_an_edited_record_that_chain_only(built, tmp_path):
    root, _ = built
    assert plan(root)[1] == set()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    records = copy / "data" / dataset("qwen3") / "train.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("Sign the", "Then sign the")
    records.write_text("".join(lines))
    assert plan(copy)[1] == {(stage, dataset("qwen3")) for stage in CHAIN}

"""Content-keyed reruns: each scenario asserts the exact set of jobs Snakemake schedules.

One small base state (two datasets, a few images, a few training steps) is built once for
real (two jobs at a time), published to a local DVC remote and committed. Scenarios that
exercise decisions ask Snakemake for its plan in this process (the workflow parsed and its
DAG built through Snakemake's API: a fraction of a second, no job started). Scenarios about
edited code ask `snakemake -n` in a fresh interpreter, which imports the edited package. The
few that must show what a job did — restored from the run-cache or recomputed — run for real.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, digest, edit_config, git, run_tool
from PIL import Image, ImageDraw
from workflow_plans import plan

from loramill.files import read_jsonl

# Each scenario starts from its own copy of the session's build, so any worker may run it.
pytestmark = [pytest.mark.workflow, pytest.mark.spread]

A, B, T = "wide_bands", "paper_stripes", "station_procedures"  # T: a text dataset
V = f"{B}.validation"  # B's validation folder, data/paper_stripes/validation (the demo's)
PREPARE = ("resize", "caption", "merge_captions")
CHAIN = (*PREPARE, "train", "export", "grid")
TEXT_CHAIN = ("text_prepare", "text_train", "text_export", "text_evaluate")
DEFAULT_CHAIN = {T: TEXT_CHAIN, V: PREPARE, B: (*CHAIN, "validate")}


def snakemake(root: Path, *args: str):
    return run_tool("snakemake", *args, cwd=root)


def jobs(result) -> set[tuple[str, str]]:
    """(rule, dataset) of every job Snakemake planned or started, from its own report."""
    found = set()
    for block in re.split(r"\n(?=\[[^\]]+\]\n)", result.stdout + "\n" + result.stderr):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        ds = re.search(r"wildcards: ds=(\S+)", block)
        if rule and ds:
            found.add((rule.group(1), ds.group(1)))
    return found


def computed(root: Path, ran: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Jobs that did their work, as opposed to restoring it from the run-cache (their log says
    so, naming the stage and dataset)."""
    said = "{}: restored from the run-cache"
    return {
        (rule, ds)
        for rule, ds in ran
        if said.format(f"{rule} {ds}") not in (root / "logs" / rule / f"{ds}.log").read_text()
    }


def chain(ds: str, *stages: str) -> set[tuple[str, str]]:
    return {(stage, ds) for stage in (stages or DEFAULT_CHAIN.get(ds, CHAIN))}


def run(root: Path, *args: str):
    result = snakemake(root, "--cores", "1", "train_all", *args)
    return result, jobs(result)


def dry_run(root: Path, *args: str):
    """What Snakemake would run, from `snakemake -n` in a fresh interpreter."""
    result = snakemake(root, "-n", "train_all", *args)
    return result, jobs(result)


def clone_and_pull(source: Path, dest: Path) -> Path:
    git(dest.parent, "clone", "-q", str(source), str(dest))
    run_tool("dvc", "pull", cwd=dest)
    return dest


@pytest.fixture(scope="module")
def base(small_build) -> Path:
    """A committed, published repository whose datasets are all built, with its own remote
    (conftest's one small build, shared with the Slurm tests)."""
    assert jobs(small_build.result) == chain(A) | chain(B) | chain(V) | chain(T)
    return small_build.built


@pytest.fixture
def repo(base, tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(base, copy, symlinks=True)
    return copy


# --- end to end: what jobs did ----------------------------------------------------------------


def test_no_change_runs_nothing(repo):
    assert run(repo)[1] == set()


def test_changed_image_reruns_that_datasets_chain_and_its_revert_restores(repo):
    image = sorted((repo / "data" / A / "images").glob("*.png"))[0]
    original = image.read_bytes()
    with Image.open(image) as opened:
        changed = opened.convert("RGB")
    middle = (changed.width / 2, changed.height / 2)
    box = [(middle[0] - 4, middle[1] - 4), (middle[0] + 4, middle[1] + 4)]
    ImageDraw.Draw(changed).ellipse(box, fill=(255, 0, 255))  # every crop keeps it
    changed.save(image)
    captions = (repo / "results" / A / "captions.jsonl").read_bytes()
    result, ran = run(repo)
    assert ran == computed(repo, ran) == chain(A)
    assert f"stale: resize {A}: images changed (1 changed)" in result.stderr
    # Auto captions record each image's sha256, so the merge ran; template captions come
    # from file names, so the training captions came out the same.
    assert (repo / "results" / A / "captions.jsonl").read_bytes() == captions

    image.write_bytes(original)  # back to what it was: every stage has that result cached
    ran = run(repo)[1]
    assert ran == chain(A)
    assert computed(repo, ran) == set(), "the revert recomputed instead of using the run-cache"
    assert plan(repo)[1] == set()


def test_a_grid_that_sets_no_prompts_shows_the_datasets_own_captions(base):
    # paper_stripes' grid in the small build sets none, as a new dataset's (the demo's set them)
    captions = [r["caption"] for r in read_jsonl(base / "results" / B / "captions.jsonl")]
    prompts = json.loads((base / "grids" / f"{B}.json").read_text())["axes"]["z"]["values"]
    assert prompts == list(dict.fromkeys(captions))[:2]
    assert len(prompts) == 2 and all(p.startswith("pstripe, ") for p in prompts)


def edit_record(repo: Path) -> tuple[Path, bytes]:
    """Change one answer of the text dataset; returns the file and what it held."""
    records = repo / "data" / T / "train.jsonl"
    original = records.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    lines[3] = lines[3].replace("Sign the", "Then sign the")
    records.write_text("".join(lines))
    return records, original


def test_edited_text_record_reruns_that_chain_only_and_its_revert_restores(repo):
    records, original = edit_record(repo)
    result, ran = run(repo)
    assert ran == computed(repo, ran) == chain(T)
    assert f"stale: text_prepare {T}: input records changed" in result.stderr
    records.write_bytes(original)
    ran = run(repo)[1]
    assert ran == chain(T)
    assert computed(repo, ran) == set(), "the revert recomputed instead of using the run-cache"
    assert plan(repo)[1] == set()


def test_teammate_changes_a_grid_axis_after_clone_and_pull(base, tmp_path):
    teammate = clone_and_pull(base, tmp_path / "teammate")
    assert plan(teammate)[1] == set()
    edit_config(teammate, lambda c: c["grid"].update(strengths=[0.0, 0.5, 1.0]))
    assert plan(teammate)[1] == {("grid", A), ("grid", B)}
    # one of them run for real, from the pulled checkpoints and exports: rendered anew
    result = snakemake(teammate, "--cores", "1", f"grids/{A}.png")
    ran = jobs(result)
    assert ran == computed(teammate, ran) == {("grid", A)}
    cells = json.loads((teammate / "grids" / f"{A}.json").read_text())["cells"]
    assert {cell["unet_strength"] for cell in cells} == {0.0, 0.5, 1.0}


# --- plans: what Snakemake would schedule -----------------------------------------------------


def test_touching_every_file_plans_nothing(repo):
    for folder in ("data", "scripts", "src", "config", "models", "results"):
        for path in (repo / folder).rglob("*"):
            if path.is_file():
                path.touch()
    assert plan(repo)[1] == set()


def test_system_files_in_dataset_folders_plan_nothing(repo):
    for folder in ("images", "captions"):
        (repo / "data" / A / folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (repo / "data" / A / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (repo / "data" / A / "captions" / "notes.md").write_text("to do: recaption the red ones\n")
    assert plan(repo)[1] == set()


def test_comment_docstring_and_format_edits_in_a_shared_module_plan_nothing(repo):
    # files.py: every stage writes through it.
    edit_code(repo, "files.py", '"""Atomic output writing', '"""Atomic (really) output writing')
    edit_code(repo, "files.py", "def write_text(", "# a comment\ndef write_text(  ")
    edit_code(repo, "files.py", "\n\n\n", "\n\n\n# between functions\n\n")
    assert dry_run(repo)[1] == set()


def edit_code(repo: Path, module: str, old: str, new: str) -> None:
    path = repo / "src" / "loramill" / module
    source = path.read_text()
    assert old in source
    path.write_text(source.replace(old, new, 1))


def test_code_change_plans_the_stages_that_reach_it(repo):
    # to_kohya: the export writes through it, and the grid renders what the export holds.
    edit_code(repo, "export/write.py", '"checkpoint holds no LoRA tensors"', '"no LoRA tensors"')
    assert dry_run(repo)[1] == chain(A, "export", "grid") | chain(B, "export", "grid")


def test_code_change_the_grid_never_reaches_plans_exports_and_the_grids_after_them(repo):
    # The grid reads the export's files: it runs after the export (and, when those come out
    # byte-identical, restores its outputs from the run-cache instead of rendering).
    edit_code(repo, "export/write.py", 'metadata["format"] = ', 'metadata["format"] = "" or ')
    result, ran = dry_run(repo)
    assert ran == chain(A, "export", "grid") | chain(B, "export", "grid")
    assert f"stale: grid {A}: after export" in result.stderr


def test_change_to_the_code_that_builds_grid_prompts_plans_grids_only(repo):
    edit_code(repo, "config.py", '.strip(" ,")', '.strip(" ,") + ", high quality"')
    result, ran = dry_run(repo)
    assert ran == {("grid", A)}  # B's grid sets no prompts: its captions, not changed
    assert f"stale: grid {A}: config grid.prompts changed" in result.stderr


def move_module(repo: Path, old: str, new: str) -> None:
    """Move module ``loramill.<old>`` to ``loramill.<new>`` (a new subpackage's docstring
    included) and rewrite every import of it, as a refactoring tool would."""
    source = repo / "src" / "loramill"
    target = source.joinpath(*new.split(".")).with_suffix(".py")
    target.parent.mkdir(exist_ok=True)
    (target.parent / "__init__.py").write_text('"""Settings."""\n')
    source.joinpath(*old.split(".")).with_suffix(".py").rename(target)
    pattern = re.compile(rf"\bloramill\.{re.escape(old)}\b")
    files = [*source.rglob("*.py"), *repo.glob("scripts/*.py"), *repo.glob("rules/*.smk")]
    for path in files:
        text = path.read_text()
        if pattern.search(text):
            path.write_text(pattern.sub(f"loramill.{new}", text))


def test_a_module_moved_into_a_subpackage_plans_nothing_and_an_edit_to_it_its_stages(repo):
    move_module(repo, "config", "settings.config")
    assert dry_run(repo)[1] == set()
    edit_code(repo, "settings/config.py", '.strip(" ,")', '.strip(" ,") + ", high quality"')
    assert dry_run(repo)[1] == {("grid", A)}  # B's grid: prompts from its captions


def test_renaming_a_function_and_its_callers_plans_nothing(repo):
    path = repo / "src" / "loramill" / "config.py"
    assert path.read_text().count("grid_prompts(") == 2  # the definition and its one caller
    path.write_text(path.read_text().replace("grid_prompts(", "prompts_with_trigger("))
    assert dry_run(repo)[1] == set()


def test_an_edit_to_a_subpackage_init_a_stage_imports_plans_that_stage(repo):
    init = repo / "src" / "loramill" / "grid" / "__init__.py"
    effect = '\nimport warnings\n\nwarnings.filterwarnings("ignore", message="cell")\n'
    init.write_text(init.read_text() + effect)
    assert dry_run(repo)[1] == {("grid", A), ("grid", B)}


def test_caption_edit_plans_merge_onward_and_says_why(repo):
    (repo / "data" / A / "captions" / "green_band_on_black_09.txt").write_text("a green disc\n")
    stderr, ran = plan(repo)
    assert ran == chain(A, "merge_captions", "train", "export", "grid")
    assert f"stale: merge_captions {A}: captions edited (1 image)" in stderr
    assert f"stale: train {A}: after merge_captions" in stderr


def test_edited_rows_of_the_table_plan_merge_onward_and_say_how_many(repo):
    table = repo / "data" / A / "metadata.csv"
    edited = {p.stem for p in (repo / "data" / A / "captions").iterdir()}  # by sidecars
    images = sorted(p.name for p in (table.parent / "images").iterdir() if p.stem not in edited)
    rows = [f"{name},a band {n}" for n, name in enumerate(images[:3])]
    table.write_text("filename,prompt\n" + "\n".join(rows) + "\n")
    stderr = plan(repo)[0]
    assert f"stale: merge_captions {A}: captions edited (3 images)" in stderr
    snakemake(repo, "--cores", "1", f"results/{A}/captions.jsonl")  # the merge: what it counts
    table.write_text(table.read_text().replace("a band 0", "a wide band"))
    stderr, ran = plan(repo)
    assert ran == chain(A, "merge_captions", "train", "export", "grid")
    assert f"stale: merge_captions {A}: captions edited (1 image)" in stderr


def test_grid_axis_change_plans_grids_only(repo):
    edit_config(repo, lambda c: c["grid"].update(strengths=[0.0, 0.5, 1.0]))
    assert plan(repo)[1] == {("grid", A), ("grid", B)}


def test_text_settings_plan_the_stages_that_read_them(repo):
    edit_config(repo, lambda c: c["text"]["evaluate"].update(max_new_tokens=6))
    stderr, ran = plan(repo)
    assert ran == {("text_evaluate", T)}
    assert f"stale: text_evaluate {T}: config text.evaluate.max_new_tokens changed" in stderr
    edit_config(repo, lambda c: c["text"]["train"].update(learning_rate=1e-3))
    assert plan(repo)[1] == chain(T, "text_train", "text_export", "text_evaluate")
    edit_config(repo, lambda c: c["text"]["prepare"].update(max_seq_length=64))
    assert plan(repo)[1] == chain(T)


def test_eval_records_of_its_own_replan_the_text_chain(repo):
    lines = (repo / "data" / T / "train.jsonl").read_text().splitlines(keepends=True)
    (repo / "data" / T / "eval.jsonl").write_text("".join(lines[:5]))
    stderr, ran = plan(repo)
    assert ran == chain(T)
    assert f"stale: text_prepare {T}: " in stderr


def set_learning_rate(value):
    def change(config):
        config["datasets"][A].setdefault("train", {})["learning_rate"] = value

    return change


def test_learning_rate_plans_train_onward_and_its_revert_nothing(repo):
    global_rate = yaml.safe_load((repo / "config" / "config.yaml").read_text())["train"]
    edit_config(repo, set_learning_rate(global_rate["learning_rate"] * 2))
    stderr, ran = plan(repo)
    assert ran == chain(A, "train", "export", "grid")
    assert f"stale: train {A}: config train.learning_rate changed" in stderr
    edit_config(repo, set_learning_rate(global_rate["learning_rate"]))  # the value it had
    assert plan(repo)[1] == set()


def test_a_validation_image_added_measures_again_and_trains_nothing(repo):
    """Issue #32: the validation folder is prepared as a dataset of its own, and validation
    reads the checkpoints, so a new validation image reaches the model card and the grid after
    it, never training."""
    from loramill.demo.images import generate_dataset

    generate_dataset(repo / "tmp", "stripes", 5, seed=99)
    added = sorted((repo / "tmp" / "images").iterdir())[-1]
    shutil.move(added, repo / "data" / B / "validation" / "images" / f"added{added.suffix}")
    stderr, ran = plan(repo)
    assert ran == chain(V) | chain(B, "validate", "export", "grid")
    assert f"stale: resize {V}: images changed (1 added)" in stderr
    assert f"stale: validate {B}: after merge_captions" in stderr


def test_regularization_images_added_are_prepared_and_retrain(repo):
    """Issue #32: data/<ds>/reg/ is prepared as a dataset of its own; training reads it."""
    from loramill.demo.images import generate_dataset

    generate_dataset(repo / "data" / A / "reg", "circles", 3)
    stderr, ran = plan(repo)
    assert ran == chain(f"{A}.reg", *PREPARE) | chain(A, "train", "export", "grid")
    assert f"stale: train {A}: after merge_captions {A}.reg, resize {A}.reg" in stderr


def test_another_datasets_images_as_regularization_images_retrain_only(repo):
    edit_config(repo, lambda c: c["datasets"][A].setdefault("train", {}).update(reg_data=B))
    stderr, ran = plan(repo)
    assert ran == chain(A, "train", "export", "grid")  # B's prepared images, as they are
    assert f"stale: train {A}: config train.reg_data changed" in stderr


def test_a_validation_seed_measures_again_and_trains_nothing(repo):
    edit_config(repo, lambda c: c["datasets"][B].setdefault("train", {}).update(validation_seed=5))
    stderr, ran = plan(repo)
    assert ran == chain(B, "validate", "export", "grid")
    assert f"stale: validate {B}: config train.validation_seed changed" in stderr


def test_forcerun_train_plans_its_consumers_too(repo):
    result, ran = dry_run(repo, "-R", "train")  # the command line users type
    assert ran == chain(A, "train", "export", "grid") | chain(
        B, "train", "validate", "export", "grid"
    )
    assert f"stale: export {A}: after train" in result.stderr
    assert plan(repo, f"results/{A}/checkpoints")[1] == chain(A, "train", "export", "grid")


def test_renamed_dataset_plans_no_training(repo):
    shutil.move(repo / "data" / A, repo / "data" / "renamed")  # data/ is DVC's, not git's
    edit_config(repo, lambda c: c["datasets"].update(renamed=c["datasets"].pop(A)))
    stderr, ran = plan(repo)
    # The export names the adapter, and the grid shows the export's files (its cells come
    # back from their cache); nothing before them depends on the name.
    assert ran == {("export", "renamed"), ("grid", "renamed")}
    assert f"train renamed: built as {A} before" in stderr
    assert f"restored: train renamed from the run-cache (same inputs as {A}): " in stderr


def test_renamed_text_dataset_plans_its_export_only(repo):
    shutil.move(repo / "data" / T, repo / "data" / "procedures")
    edit_config(repo, lambda c: c["datasets"].update(procedures=c["datasets"].pop(T)))
    stderr, ran = plan(repo)
    assert ran == {("text_export", "procedures")}  # the adapter's name is in its card and GGUF
    assert f"text_train procedures: built as {T} before" in stderr


def test_removed_results_are_restored_not_rebuilt(repo, base):
    shutil.rmtree(repo / "results" / A)
    (repo / "exports" / f"{A}.safetensors").unlink()
    stderr, ran = plan(repo)
    assert ran == set()  # "Nothing to be done", and it says what came back
    missing = "from the run-cache (outputs were missing)"
    assert f"restored: train {A} {missing}: results/{A}/checkpoints" in stderr
    assert f"restored: export {A} {missing}: exports/{A}.safetensors\n" in stderr
    for path in (f"exports/{A}.safetensors", f"results/{A}/checkpoints/step-000002.safetensors"):
        assert digest(repo / path) == digest(base / path)


def test_dataset_moved_with_path_plans_nothing(repo):
    (repo / "elsewhere").mkdir()
    shutil.move(repo / "data" / A, repo / "elsewhere" / "bands")
    edit_config(repo, lambda c: c["datasets"][A].update(path="elsewhere/bands"))
    assert plan(repo)[1] == set()


def test_git_folder_inside_the_base_model_plans_nothing(repo):
    model = repo / yaml.safe_load((repo / "config" / "config.yaml").read_text())["base_model"]
    (model / ".git" / "objects").mkdir(parents=True)
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / "v1-5-pruned-emaonly.safetensors").write_bytes(b"an unused single-file checkpoint")
    assert plan(repo)[1] == set()


def test_lock_missing_a_key_replans_that_stage_with_a_warning(repo):
    lock_file = repo / "locks" / B / "grid.json"
    lock = json.loads(lock_file.read_text())
    del lock["outputs"]
    lock_file.write_text(json.dumps(lock))
    stderr, ran = plan(repo)
    assert ran == {("grid", B)}
    warnings = [line for line in stderr.splitlines() if "grid.json" in line]
    assert warnings == [f"loramill: locks/{B}/grid.json: missing outputs; grid {B} will be rebuilt"]


def test_new_dataset_plans_only_its_chain(repo):
    shutil.copytree(repo / "data" / B, repo / "data" / "extra")
    sorted((repo / "data" / "extra" / "images").iterdir())[0].unlink()  # not a copy of B's
    edit_config(repo, lambda c: c["datasets"].update(extra={"trigger": "xtra"}))
    # With a copy of B's validation folder, measured too: its resize takes over the result
    # of B's (same images, same settings), its captions carry the new trigger.
    validation = chain("extra.validation", "caption", "merge_captions")
    assert plan(repo)[1] == chain("extra", *CHAIN, "validate") | validation


def test_removed_dataset_leaves_the_rest_alone(repo):
    edit_config(repo, lambda c: c["datasets"].pop(B))
    assert plan(repo)[1] == set()


def test_fresh_clone_and_dvc_pull_plans_nothing(base, tmp_path):
    clone = clone_and_pull(base, tmp_path / "clone")
    assert plan(clone)[1] == set()
    for path in (f"exports/{A}.safetensors", f"exports/{B}.safetensors",
                 f"exports/{T}/{T}.gguf", f"evaluations/{T}.json"):  # fmt: skip
        assert digest(clone / path) == digest(base / path), path


def test_teammates_new_image_plans_that_chain_after_clone(base, tmp_path):
    teammate = clone_and_pull(base, tmp_path / "teammate")
    shutil.copy(
        sorted((teammate / "data" / A / "images").glob("*.png"))[0],
        teammate / "data" / A / "images" / "new_image.png",
    )
    run_tool("dvc", "add", "data", cwd=teammate)
    run_tool("dvc", "push", cwd=teammate)
    git(teammate, "commit", "-q", "-am", "new image, not retrained")

    mine = clone_and_pull(teammate, tmp_path / "mine")
    stderr, ran = plan(mine)
    assert ran == chain(A)
    assert f"stale: resize {A}: images changed (1 added)" in stderr


def test_without_the_profile_it_stops_and_says_how(repo):
    result = run_tool("snakemake", "-n", "--workflow-profile", "none", cwd=repo, check=False)
    assert result.returncode != 0
    assert "loramill: content-keyed reruns need the workflow profile" in result.stderr


def test_the_edits_file_is_never_written(repo):
    """Merging, a forced rerun of the chain and re-captioning leave metadata.csv as it was."""
    table = repo / "data" / A / "metadata.csv"
    table.write_bytes(b"filename,prompt,mode\r\ngreen_band_on_black_09.png,a green disc,\r\n")
    before = table.read_bytes()
    target = f"results/{A}/captions.jsonl"
    # -F: every job up to the captions runs (the merge computes: the table is new to it)
    ran = jobs(snakemake(repo, "--cores", "2", target, "-F"))
    assert ran == chain(A, "resize", "caption", "merge_captions")
    assert ("merge_captions", A) in computed(repo, ran)
    assert table.read_bytes() == before
    captions = {r["image"]: r["caption"] for r in map(json.loads, (repo / target).open())}
    assert captions["green_band_on_black_09.png"] == "wband, a green disc"


# --- interrupted runs: stopped promptly, resumed, and nothing stale behind an exit 0 ----------


STATES = ".cache/train/*/state/step-*.pt"  # training states, saved to resume from


def train_steps(repo: Path, steps: int, save_steps: int | None = None) -> None:
    """A's training: ``steps`` steps, by default one checkpoint (its grid: one column)."""
    train = {"max_train_steps": steps, "save_steps": save_steps or steps}
    edit_config(repo, lambda c: c["datasets"][A].update(train=train))


def interrupt_training(
    repo: Path, signal_to: str, number: int
) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Start `snakemake --cores 1 train_all` with A's training made endless (100000 steps:
    hours here), and once it has trained a step past the build's 2 (its state saved at every
    step) send ``number`` to Snakemake alone or to its whole process group. Returns what the run
    printed and the names of the states it saved."""
    train_steps(repo, 100_000, save_steps=1)
    before = set(repo.glob(STATES))
    command = [str(BIN / "snakemake"), "--cores", "1", "train_all"]
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not set(repo.glob(STATES)) - before:
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.05)
    (os.kill if signal_to == "snakemake" else os.killpg)(process.pid, number)
    out, _ = process.communicate(timeout=300)
    while time.monotonic() < deadline:  # every process it started has ended
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a job process outlived the interrupted run")
    saved = {path.name for path in set(repo.glob(STATES)) - before}  # the states it saved
    return subprocess.CompletedProcess(command, process.returncode, out, ""), saved


@pytest.mark.parametrize(
    ("signal_to", "number", "resume"),
    [("snakemake", signal.SIGINT, False), ("group", signal.SIGINT, True),
     ("group", signal.SIGTERM, False)],
    ids=["SIGINT to Snakemake alone", "Ctrl-C (SIGINT to the group)", "SIGTERM (Slurm)"],
)  # fmt: skip
def test_interrupted_training_saves_resumes_and_leaves_nothing_stale(
    repo, signal_to, number, resume
):
    lock = (repo / "locks" / A / "train.json").read_bytes()
    result, saved = interrupt_training(repo, signal_to, number)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout and "Logging error" not in result.stdout
    name = signal.Signals(number).name
    found = re.search(rf"train {A}: interrupted \({name}\): state saved at step (\d+); "
                      r"rerun the same command to resume\n", result.stdout)  # fmt: skip
    assert found, result.stdout
    step = int(found.group(1))
    assert 3 <= step < 100_000  # stopped at a step boundary, past the state it continued
    # the run ends with the failed job's one line (Snakemake's own last words follow)
    summary = result.stdout.split("loramill: 1 job(s) failed:\n")[-1]
    assert summary.startswith(f"  train {A}: interrupted ({name}): state saved at step {step};")
    assert (repo / "locks" / A / "train.json").read_bytes() == lock  # nothing claimed built
    assert f"step-{step:06d}.pt" in saved
    if not resume:
        return  # the state is saved by the same code whichever signal stopped it

    # One rerun finishes everything, resuming the saved state; it stops one step past it (where
    # a run stops is not part of its state: see loramill.train.state).
    train_steps(repo, step + 1)
    ran = run(repo)[1]
    assert ran == chain(A, "train", "export", "grid")
    assert f"resumed from step {step}\n" in (repo / "logs" / "train" / f"{A}.log").read_text()
    assert (repo / "exports" / f"{A}-steps" / f"{A}-{step + 1:06d}.safetensors").exists()
    assert plan(repo)[1] == set()  # and a third plans nothing


def test_a_producer_run_snakemake_found_incomplete_takes_its_stale_consumers_along(repo):
    """The state an orphaned training used to leave: it finished and wrote its lock after
    Snakemake had given up on it and marked its outputs incomplete. The next run reruns it
    (restored from the run-cache) and must also run the consumers it makes stale."""
    edit_config(repo, lambda c: c["datasets"][A].update(train={"max_train_steps": 3}))
    snakemake(repo, "--cores", "1", f"results/{A}/checkpoints")  # train only
    incomplete = repo / ".snakemake" / "incomplete"
    incomplete.mkdir(parents=True, exist_ok=True)
    # Snakemake's marker: the output path, base64, under .snakemake/incomplete
    marker = base64.urlsafe_b64encode(f"results/{A}/checkpoints".encode()).decode()
    (incomplete / marker).write_text('{"external_jobid": null}')
    result, ran = dry_run(repo)
    assert ran == chain(A, "train", "export", "grid"), result.stdout


def test_one_datasets_failure_lets_the_others_finish_and_ends_with_its_reason(repo):
    for image in (repo / "data" / A / "images").iterdir():
        image.write_bytes(b"not an image")  # every image quarantined: resize fails
    # the other dataset's work: a grid with one strength more (a job of its own, rendered)
    edit_config(repo, lambda c: c["datasets"][B].update(grid={"strengths": [0.0, 0.5, 1.0]}))
    result = run_tool("snakemake", "--cores", "1", "train_all", cwd=repo, check=False)
    assert result.returncode != 0
    assert jobs(result) == chain(A, "resize") | chain(B, "grid")
    assert computed(repo, chain(B, "grid")) == chain(B, "grid")
    strengths = json.loads((repo / "grids" / f"{B}.json").read_text())["axes"]["y"]["labels"]
    assert strengths == ["Strength: 0", "Strength: 0.5", "Strength: 1"]
    tail = (result.stdout + result.stderr).split("loramill: 1 job(s) failed:\n")[-1]
    assert tail.startswith(f"  resize {A}: "), tail
    assert "no usable image" in tail.splitlines()[0]

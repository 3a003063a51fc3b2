"""Bad configuration stops Snakemake before any job, with one line naming the culprit.

The checks are asked in this process, through the code the workflow runs at parse time
(loramill.workflow_config.load_datasets, which rules/common.smk calls) on the config Snakemake
hands it. Two real `snakemake -n` runs prove the rest: a valid config plans the whole chain
(and parsing imports no torch), and an error reaches the terminal as that one line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil

import jsonschema
import pytest
import yaml
from conftest import REPO, run_tool
from snakemake.common.configfile import _load_configfile, load_configfile
from snakemake.utils import update_config, validate

from loramill import LoramillError
from loramill.config import check_yaml_syntax, coerce_numbers, dataset_config, describe, schema
from loramill.demo.images import generate_dataset
from loramill.demo.text import procedure_records, write_jsonl
from loramill.reruns.fingerprints import fingerprint
from loramill.workflow_config import load_datasets, validate_config

TEXT = "station_procedures"

WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "profiles", "envs", "src")
# What the workflow must not import to parse and plan: every Snakemake invocation, and every
# job, parses it, and these take seconds to import.
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")
# `snakemake ARGS` as its console script runs it, then which of HEAVY it had imported.
SNAKEMAKE_SAYING_IMPORTS = f"""
import sys
from snakemake.cli import main
sys.argv[0] = "snakemake"
try:
    main()
finally:
    print("imported:", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    for name in WORKFLOW_FILES:
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, root / name)
    (root / "models").symlink_to(REPO / "models")
    for ds, entry in yaml.safe_load((REPO / "config" / "config.yaml").read_text())[
        "datasets"
    ].items():
        if (entry or {}).get("task") == "text":
            write_jsonl(procedure_records(20), root / "data" / ds / "train.jsonl")
        else:
            generate_dataset(root / "data" / ds, "circles", 2)
    return root


def config_error(workdir, tmp_path, override) -> str:
    """The line `snakemake -n --configfile override.yaml` prints, from the parse-time checks
    given the config as Snakemake builds it: config/config.yaml, the --configfile over it."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(override))
    config = load_configfile(workdir / "config" / "config.yaml")
    update_config(config, load_configfile(extra))
    with contextlib.chdir(workdir), pytest.raises(LoramillError) as raised:
        load_datasets(config)
    return f"loramill: {raised.value}"


def error_line(result):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loramill:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_valid_config_plans_the_whole_chain_without_torch(workdir, tmp_path):
    # numbers as YAML users also write them: quoted, and 1e-4 (a string to YAML 1.1)
    quoted = {"train": {"rank": "4", "learning_rate": "1e-4"}, "grid": {"seed": ["7"]}}
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(quoted))
    result = run_tool(
        "python", "-c", SNAKEMAKE_SAYING_IMPORTS, "-n", "--configfile", str(extra),
        cwd=workdir, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for rule in ("resize", "caption", "merge_captions", "train", "export", "grid"):
        assert rule in result.stdout
    for rule in ("text_prepare", "text_train", "text_export", "text_evaluate"):
        assert f"rule {rule}:\n" in result.stdout and f"ds={TEXT}" in result.stdout
    assert result.stderr.splitlines()[-1] == "imported:"  # none of HEAVY


def test_a_config_error_reaches_the_terminal_as_one_line(workdir):
    # Without the workflow profile too: the config is checked before the profile's settings.
    result = run_tool(
        "snakemake", "-n", "--workflow-profile", "none", "--config", "base_model=./x",
        cwd=workdir, check=False,
    )  # fmt: skip
    assert error_line(result) == (
        "loramill: base_model './x': no such folder, and not a hub id (owner/name)"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"train": {"rank": 0}}, "loramill: config: train.rank: 0 is less than the minimum of 1"),
        (
            {"train": {"learning_rate": "fast"}},
            "config: train.learning_rate: 'fast' is not of type",
        ),
        ({"train": {"rnak": 4}}, "config: train.rnak: unknown option (did you mean rank?)"),
        ({"resize": {"resolution": 100}}, "config: resize.resolution: 100 is not a multiple of 8"),
        (
            {"datasets": {"wide_bands": {"train": {"seed": -3}}}},
            "config: datasets.wide_bands.train.seed: -3 is less than the minimum of 0",
        ),
        (
            {"caption": {"backend": "magic"}},
            "caption.backend 'magic': unknown captioner; "
            "choose one of: blip, clip, none, template, vlm, wd14",
        ),
        ({"grid": {"strengths": []}}, "config: grid.strengths: [] should be non-empty"),
        (
            {"train": {"lr_scheduler_num_cycles": 3}},
            "config: datasets.wide_bands.train.lr_scheduler_num_cycles: 3 has no effect with "
            "train.lr_scheduler: constant",
        ),
        (
            {"train": {"dtype": "float16"}},
            "loramill: config: train.dtype: replaced by train.mixed_precision (no | fp16 | bf16)",
        ),
        (
            {"train": {"no_half_vae": True}},
            "loramill: config: train.no_half_vae: the VAE always encodes in float32 here",
        ),
        (
            {"train": {"cache_text_encoder_outputs": True}},
            "loramill: config: train.cache_text_encoder_outputs: the frozen text encoders' "
            "outputs are always cached here",
        ),
        (
            {"train": {"lr_warmup_steps": 5}},
            "config: datasets.wide_bands.train.lr_warmup_steps: 5 has no effect with "
            "lr_scheduler: constant; use lr_scheduler: constant_with_warmup",
        ),
        (
            {"device": "cpu", "train": {"mixed_precision": "fp16"}},
            "config: datasets.wide_bands.train.mixed_precision: fp16 needs a CUDA GPU",
        ),
        (
            {"train": {"init_from": "exports/none.safetensors"}},
            "config: datasets.wide_bands.train.init_from: exports/none.safetensors is not a",
        ),
        (
            {"train": {"num_machines": 2}},
            "config: datasets.wide_bands.train.rdzv_endpoint: num_machines: 2 needs HOST:PORT",
        ),
        (
            {"train": {"rdzv_endpoint": "node001:29500"}},
            "config: datasets.wide_bands.train.rdzv_endpoint: node001:29500 has no effect with "
            "train.num_machines: 1",
        ),
        ({"device": "gpu"}, "config: device: 'gpu' is not one of ['auto', 'cpu', 'cuda']"),
        (
            {"train": {"network_type": "lycoris"}},
            "config: train.network_type: 'lycoris' is not one of ['lora', 'loha', 'lokr', 'dora']",
        ),
        (
            {"train": {"ema_decay": 0.99}},
            "config: datasets.wide_bands.train.ema_decay: 0.99 has no effect with train.ema: "
            "false; use ema: true, or drop ema_decay",
        ),
        (
            {"train": {"prior_loss_weight": 0.5}},
            "config: datasets.wide_bands.train.prior_loss_weight has no effect without "
            "regularization images: add data/wide_bands/reg/images/, or set train.reg_data",
        ),
        (
            {"datasets": {"wide_bands": {"train": {"reg_data": "nowhere"}}}},
            "config: datasets.wide_bands.train.reg_data 'nowhere': neither a dataset of the "
            "config nor a folder with images/ (a folder is laid out as a dataset: images/, "
            "optional captions/ and metadata.csv)",
        ),
        (
            {"datasets": {"wide_bands": {"train": {"reg_data": "wide_bands"}}}},
            "config: datasets.wide_bands.train.reg_data 'wide_bands': name another image "
            "dataset, or a folder",
        ),
        (
            {"datasets": {"wide_bands": {"train": {"reg_data": TEXT}}}},
            f"config: datasets.wide_bands.train.reg_data '{TEXT}': name another image "
            "dataset, or a folder",
        ),
        (
            {"train": {"alpha_mask": True}},
            "config: datasets.wide_bands.train.alpha_mask: True has no effect with "
            "train.masked_loss: false; use masked_loss: true, or drop alpha_mask",
        ),
        (
            {"train": {"validation_seed": 3}},
            "config: datasets.wide_bands.train.validation_seed has no effect without validation "
            "images: set train.validation_split, or add validation images in "
            "data/wide_bands/validation/images",
        ),
        (
            {"train": {"validate_every_n_steps": 5}},
            "config: datasets.wide_bands.train.validate_every_n_steps has no effect without "
            "validation images: set train.validation_split, or add validation images in "
            "data/wide_bands/validation/images",
        ),
        (
            {"export": {"checkpoint": "best"}},
            "config: datasets.wide_bands.export.checkpoint: best needs a validation loss: set "
            "train.validation_split, or add validation images in data/wide_bands/validation/images",
        ),
        (
            {"grid": {"checkpoints": "best:2"}},
            "config: datasets.wide_bands.grid.checkpoints: best:N needs a validation loss: set "
            "train.validation_split, or add validation images in data/wide_bands/validation/images",
        ),
        (
            {"train": {"validation_split": 1}},
            "config: train.validation_split: 1 is greater than or equal to the maximum of 1",
        ),
        (
            {"export": {"use_ema": True}},
            "config: datasets.wide_bands.export.use_ema: true has no effect with train.ema: "
            "false; use ema: true, or drop use_ema",
        ),
        (
            {"train": {"factor": 4}},
            "config: datasets.wide_bands.train.factor: 4 has no effect with train.network_type: "
            "lora; use network_type: lokr, or drop factor",
        ),
        (
            {"train": {"network_type": "loha", "loraplus_lr_ratio": 4}},
            "config: datasets.wide_bands.train.loraplus_lr_ratio: not available with "
            "network_type: loha; use network_type: lora, or drop it",
        ),
        (
            {"train": {"network_type": "dora", "module_dropout": 0.1}},
            "config: datasets.wide_bands.train.module_dropout: not available with "
            "network_type: dora; use network_type: lora, or drop it",
        ),
        (
            {"train": {"network_type": "lokr", "network_dropout": 0.1}},
            "config: datasets.wide_bands.train.network_dropout: not available with "
            "network_type: lokr; use network_type: lora, or drop it",
        ),
        (
            {"text": {"train": {"lora_rank": 0}}},
            "config: text.train.lora_rank: 0 is less than the minimum of 1",
        ),
        # what TextTrainConfig refuses, the schema refuses at parse (no torch imported for it)
        ({"text": {"train": {"rank": 8}}}, "config: text.train.rank: unknown option"),
        (
            {"text": {"train": {"mixed_precision": "fp16"}}},
            "config: text.train.mixed_precision: 'fp16' is not one of ['no', 'bf16']",
        ),
        (
            {"datasets": {TEXT: {"task": "text", "text": {"prepare": {"overflow": "wrap"}}}}},
            f"config: datasets.{TEXT}.text.prepare.overflow: 'wrap' is not one of",
        ),
        (
            {"datasets": {TEXT: {"task": "txt"}}},
            f"config: datasets.{TEXT}.task: 'txt' is not one of ['image', 'text']",
        ),
        (
            {"datasets": {TEXT: {"task": "text", "base_model": "models/tiny-sd"}}},
            "loramill: base_model 'models/tiny-sd': not a transformers model folder "
            "(no config.json)",
        ),
    ],
)
def test_invalid_values_name_the_key(workdir, tmp_path, override, expected):
    assert expected in config_error(workdir, tmp_path, override)


def test_the_schema_takes_the_text_options_text_training_takes():
    # Parsing checks text.train by the schema alone (loramill.workflow_config.check_dataset).
    from loramill.text.train import TextTrainConfig

    for precision in ("no", "bf16", "fp16", "fp8"):
        config = {"datasets": {"a": {}}, "text": {"train": {"mixed_precision": precision}}}
        try:
            validate_config(config)
            schema_takes = True
        except Exception:
            schema_takes = False
        try:
            TextTrainConfig.from_dict({"mixed_precision": precision})
            class_takes = True
        except LoramillError:
            class_takes = False
        assert schema_takes == class_takes, precision


def test_missing_base_model_is_named(workdir, tmp_path):
    line = config_error(workdir, tmp_path, {"base_model": "models/no-such-model"})
    assert line == (
        "loramill: base_model 'models/no-such-model': no such folder, and not a hub id (owner/name)"
    )


def test_unreadable_base_model_is_named(workdir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(REPO / "models" / "tiny-sd", broken)
    (broken / "model_index.json").write_text("{ not json")
    line = config_error(workdir, tmp_path, {"base_model": str(broken)})
    assert line.startswith(f"loramill: base_model '{broken}': unreadable model_index.json")

    (broken / "model_index.json").write_text(json.dumps({"_class_name": "x"}))
    shutil.rmtree(broken / "unet")
    line = config_error(workdir, tmp_path, {"base_model": str(broken)})
    assert line == f"loramill: base_model '{broken}': missing component folder 'unet/'"


OTHER_FAMILIES = {
    "refiner": (
        "StableDiffusionXLImg2ImgPipeline", {"addition_embed_type": "text_time"},
        ["text_encoder_2"], ["text_encoder"],
        "an SDXL refiner (StableDiffusionXLImg2ImgPipeline: OpenCLIP bigG only)",
    ),
    "inpainting": (
        "StableDiffusionInpaintPipeline", {"in_channels": 9}, [], [],
        "an inpainting model (StableDiffusionInpaintPipeline: its UNet takes 9 input channels, "
        "not 4)",
    ),
    "sd3": (
        "StableDiffusion3Pipeline", None, ["transformer"], ["unet"],
        "a StableDiffusion3Pipeline whose denoiser is a SD3Transformer2DModel, not a Flux "
        "transformer",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
def test_a_base_model_of_another_family_is_named_before_any_job(workdir, tmp_path, kind):
    pipeline, unet, added, removed, found = OTHER_FAMILIES[kind]
    model = tmp_path / kind
    shutil.copytree(REPO / "models" / "tiny-sd", model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    if unet is not None:
        config = json.loads((model / "unet" / "config.json").read_text())
        (model / "unet" / "config.json").write_text(json.dumps({**config, **unet}))
    for name in added:
        (model / name).mkdir()
        if name == "transformer":
            config = {"_class_name": "SD3Transformer2DModel", "in_channels": 16}
            (model / name / "config.json").write_text(json.dumps(config))
    for name in removed:
        shutil.rmtree(model / name)
    line = config_error(workdir, tmp_path, {"base_model": str(model)})
    assert line == (
        f"loramill: base_model '{model}': {found}; loramill trains Stable Diffusion 1.x/2.x "
        "and SDXL base models (a UNet on 4 latent channels), FLUX.1 [dev] / [schnell] and Chroma"
    )


def test_a_stated_family_the_base_model_is_not_is_refused_naming_both(workdir, tmp_path, tiny_sdxl):
    model = tmp_path / "xl"
    shutil.copytree(tiny_sdxl, model)
    override = {"base_model": str(model), "base_model_family": "sd1"}
    line = config_error(workdir, tmp_path, override)
    assert line == (
        f"loramill: base_model_family 'sd1' (Stable Diffusion 1.x) but base_model '{model}' is "
        "SDXL (sdxl); set base_model_family: sdxl or auto"
    )
    config = load_configfile(workdir / "config" / "config.yaml")
    for family in ("sdxl", "auto"):  # stated right, or read from the model: it trains
        update_config(config, {"base_model": str(model), "base_model_family": family})
        with contextlib.chdir(workdir):
            datasets = load_datasets(copy.deepcopy(config))
        assert {s["family"] for s in datasets.values() if s["task"] == "image"} == {"sdxl"}


def test_missing_dataset_folder_suggests_dvc_pull(workdir, tmp_path):
    line = config_error(workdir, tmp_path, {"datasets": {"ghost": {"trigger": "g"}}})
    assert (
        line == "loramill: dataset ghost: data/ghost/images not found (new clone? run `dvc pull`)"
    )


def test_missing_text_records_suggest_dvc_pull(workdir, tmp_path):
    override = {"datasets": {"notes": {"task": "text"}}}
    line = config_error(workdir, tmp_path, override)
    assert line == (
        "loramill: dataset notes: data/notes/train.jsonl not found (new clone? run `dvc pull`)"
    )


SCHEMA = REPO / "config" / "config.schema.yaml"


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    # Fails before the workflow imports anything heavy: the one real run of this kind.
    for name in ("Snakefile", "rules", "src", "profiles", "config"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, tmp_path / name)
    config = tmp_path / "config" / "config.yaml"
    lines = config.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("device:"))
    lines[row] = "device: auto: cpu"
    config.write_text("\n".join(lines) + "\n")
    result = run_tool("snakemake", "-n", cwd=tmp_path, check=False)
    line = error_line(result)
    assert line == (
        f"loramill: config/config.yaml:{row + 1}:13: mapping values are not allowed here"
    )
    assert "Snakefile" not in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  rank: 4\n\tseed: 1\n", ":3:1: found character '\\t' that cannot start"),
        (
            'caption:\n  template: "{words}\n',
            ":3:1: found unexpected end of stream (while scanning a quoted scalar at 2:13)",
        ),
        ("train:\n  rank: 4\n alpha: 3\n", ":3:2: expected <block end>, but found"),
    ],
)
def test_yaml_syntax_errors_point_at_the_cause(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(LoramillError) as raised:
        check_yaml_syntax(str(path))
    assert str(raised.value).startswith(f"{path}{expected}")


def test_json_and_valid_yaml_pass_the_syntax_check(tmp_path):
    for text in ('{"train": {"rank":\t4}}', (REPO / "config" / "config.yaml").read_text()):
        (tmp_path / "ok.yaml").write_text(text)
        check_yaml_syntax(str(tmp_path / "ok.yaml"))


def schema_error(config):
    with pytest.raises(Exception) as raised:
        validate_config(config)
    return describe(raised.value)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"devise": "cpu"}, "config: devise: unknown option (did you mean device?)"),
        (
            {"datasets": {"a": {"trigerr": "x"}}},
            "config: datasets.a.trigerr: unknown option (did you mean trigger?)",
        ),
        (
            {"grid": {"strenghts": [1.0]}},
            "config: grid.strenghts: unknown option (did you mean strengths?)",
        ),
        ({"train": {"colour": 1}}, "config: train.colour: unknown option"),
    ],
)
def test_unknown_options_suggest_the_closest_key(config, expected):
    assert schema_error({"datasets": {"a": {}}, **config}) == expected


def test_unknown_dataset_option_is_named_under_the_dataset():
    config = {"datasets": {"a": {"train": {"lerning_rate": 1.0}}}}
    validate_config(config)
    with pytest.raises(LoramillError) as raised:
        dataset_config(config, "a", validate_config)
    assert str(raised.value) == (
        "config: datasets.a.train.lerning_rate: unknown option (did you mean learning_rate?)"
    )


def loaded(text):
    """A config as the workflow reads it: numeric strings coerced, then validated."""
    config = yaml.safe_load(text)
    coerce_numbers(config, schema())
    validate_config(config)
    return config


def test_quoted_numbers_are_the_numbers_they_spell():
    quoted = loaded(
        """
        datasets:
          a: {trigger: "20", train: {max_train_steps: "20", learning_rate: 1e-4}}
        train: {rank: "4", alpha: "8"}
        grid: {strengths: ["0.5", ["1", "0.25"]], seed: ["7"], batch_size: "2"}
        resize: {background: "000"}
        """
    )
    plain = loaded(
        """
        datasets:
          a: {trigger: "20", train: {max_train_steps: 20, learning_rate: 1.0e-4}}
        train: {rank: 4, alpha: 8}
        grid: {strengths: [0.5, [1, 0.25]], seed: [7], batch_size: 2}
        resize: {background: "000"}
        """
    )
    assert quoted == plain
    settings = dataset_config(quoted, "a")
    assert settings["train"]["max_train_steps"] == 20
    assert settings["trigger"] == "20"  # a string option keeps its string
    # what the planner fingerprints: the dataset's settings
    assert fingerprint(settings) == fingerprint(dataset_config(plain, "a"))


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"rank": "4.5"}, "config: train.rank: '4.5' is not of type 'integer'"),
        ({"max_train_steps": "1_000"}, "config: train.max_train_steps: '1_000' is not of type"),
        ({"learning_rate": "nan"}, "config: train.learning_rate: 'nan' is not of type 'number'"),
    ],
)
def test_strings_that_are_not_such_numbers_are_still_refused(train, expected):
    with pytest.raises(Exception) as raised:
        loaded(yaml.safe_dump({"datasets": {"a": {}}, "train": train}))
    assert describe(raised.value).startswith(expected)


def test_option_classes_take_the_schema_defaults():
    # The schema states every default once; the classes that hold a section read theirs from
    # it, and the ones that keep their own must agree with it.
    from dataclasses import asdict, fields

    from loramill.captions.merge_rules import Rules
    from loramill.prepare.buckets import DEFAULT_RESOLUTION, BucketSpec
    from loramill.prepare.resize import Settings
    from loramill.text.train import TextTrainConfig
    from loramill.train.config import TrainConfig

    schema = yaml.safe_load(SCHEMA.read_text())

    def stated(options):
        listed = {k: o["default"] for k, o in options["properties"].items() if "default" in o}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in listed.items()}

    text = schema["$defs"]["text"]["properties"]["train"]
    # resize.resolution has no default of its own: the family's (SD's in BucketSpec)
    sd = {"resolution": DEFAULT_RESOLUTION["sd1"]}
    for section, cls in (("train", TrainConfig), (text, TextTrainConfig), ("resize", BucketSpec)):
        want = stated(schema["$defs"][section] if isinstance(section, str) else section)
        want |= sd if cls is BucketSpec else {}
        assert asdict(cls()) == {f.name: want[f.name] for f in fields(cls)}
    assert TrainConfig().max_train_steps == 1000 and TrainConfig().save_steps == 250
    resize, merge = stated(schema["$defs"]["resize"]), stated(schema["$defs"]["merge"])
    assert (Settings.background, Settings.min_side) == (resize["background"], resize["min_side"])
    rules = Rules()
    assert (rules.dedupe_tags, rules.underscores_to_spaces) == (
        merge["dedupe_tags"],
        merge["underscores_to_spaces"],
    )
    assert Rules.from_config({}, []) == rules


def both_validations(config, dataset=None):
    """What Snakemake's validate and the workflow's own (loramill.workflow_config, its schema
    parsed once) make of a copy of ``config`` (of one dataset's merged config when
    ``dataset``): the defaults filled, or the error as raised and as users read it."""
    results = []
    for check in (lambda data: validate(data, str(SCHEMA)), validate_config):
        data = copy.deepcopy(config)
        try:
            filled = check(data) if dataset is None else dataset_config(data, dataset, check)
            results.append(repr(data if dataset is None else filled))
        except Exception as error:
            cause = error  # jsonschema's error, the context of Snakemake's (and loramill's)
            while not isinstance(cause, jsonschema.ValidationError):
                cause = cause.__context__
            where = (list(cause.absolute_path), list(cause.absolute_schema_path))
            results.append((type(error), str(error), describe(error), cause.message, where))
    return results


@pytest.mark.parametrize(
    "override",
    [
        {},
        {"train": {"rank": 0}},
        {"train": {"rnak": 4}, "datasets": {"b": {"caption": {"batch_size": "x"}}}},
        {"datasets": {"wide_bands": {"train": {"lerning_rate": 1.0}}}},
        {"datasets": {TEXT: {"task": "txt"}}},
    ],
)
def test_the_workflow_validates_as_snakemake_validate_does(override):
    config = load_configfile(REPO / "config" / "config.yaml")
    update_config(config, override)
    snakemake_says, workflow_says = both_validations(config)
    assert workflow_says == snakemake_says
    if isinstance(snakemake_says, str):  # valid: the datasets are checked one by one too
        for ds in config["datasets"]:
            snakemake_says, workflow_says = both_validations(config, ds)
            assert workflow_says == snakemake_says


def test_the_schema_is_read_as_snakemake_reads_it():
    assert repr(schema()) == repr(_load_configfile(str(SCHEMA), "Schema"))


def test_filled_defaults_are_the_configs_own():
    # The schema is parsed once per process: a default put into one config and edited there
    # reaches neither the schema nor the next config.
    before = repr(schema())
    first, second = {"datasets": {"a": {}}}, {"datasets": {"a": {}}}
    validate_config(first)
    first["grid"]["strengths"].append(2.0)
    first["text"]["train"]["target_modules"].append("o_proj")
    validate_config(second)
    assert second["grid"]["strengths"] == [0.0, 0.5, 1.0]
    assert second["text"]["train"]["target_modules"] == ["q_proj", "v_proj"]
    assert repr(schema()) == before


def test_the_resolution_and_grid_guidance_left_unset_are_the_base_model_familys(
    workdir, tiny_sdxl, tiny_flux, tiny_chroma
):
    from loramill.config import grid_settings

    config = load_configfile(workdir / "config" / "config.yaml")
    config["resize"] = {}  # the demo's small sizes gone: every resize option at its default
    config["train"]["train_text_encoder"] = False  # Chroma has no encoder it would train
    for entry in config["datasets"].values():
        (entry or {}).pop("resize", None)
    chosen = {}
    models = ("models/tiny-sd", str(tiny_sdxl), str(tiny_flux), str(tiny_chroma))
    for model in models:
        with contextlib.chdir(workdir):
            datasets = load_datasets({**copy.deepcopy(config), "base_model": model})
        image = [s for s in datasets.values() if s["task"] == "image"]
        guidance = {
            grid_settings(s["grid"], s["trigger"], 64, s["family"])["guidance_scale"] for s in image
        }
        chosen[model] = ({s["resize"]["resolution"] for s in image}, guidance)
    assert chosen == dict(
        zip(
            models, [({512}, {7.5}), ({1024}, {7.5}), ({1024}, {3.5}), ({1024}, {5.0})], strict=True
        )
    )
    grid = {**image[0]["grid"], "guidance_scale": 2.0}  # one the user sets is kept
    assert grid_settings(grid, "t", 64, "flux")["guidance_scale"] == 2.0


def test_options_that_mean_nothing_for_the_family_are_refused(workdir, tmp_path, tiny_sdxl):
    line = config_error(
        workdir, tmp_path, {"base_model": str(tiny_sdxl), "train": {"clip_skip": 2}}
    )
    assert line.startswith("loramill: config: datasets.")
    assert line.endswith(
        "train.clip_skip 2: SDXL is conditioned on each text encoder's penultimate layer "
        "(kohya's sdxl_train_network ignores clip_skip); remove it"
    )
    line = config_error(workdir, tmp_path, {"train": {"text_encoder_lr": [1e-4, 1e-5]}})
    assert line.endswith(
        "train.text_encoder_lr: 2 rates for 1 text encoders; give one number, or a list of one "
        "per text encoder (SDXL has two)"
    )


FLUX_REFUSALS = {
    "sd-only option on flux": (
        "flux", {"train": {"clip_skip": 2}},
        "train.clip_skip: an option of the Stable Diffusion families, and the base model is "
        "flux; remove it",
    ),
    "flux option on sd1": (
        "sd", {"train": {"timestep_sampling": "shift"}},
        "train.timestep_sampling: an option of FLUX.1 and Chroma, and the base model is sd1; "
        "remove it",
    ),
    "network target": (
        "flux", {"train": {"network_target": "attention"}},
        "train.network_target 'attention': Flux trains kohya's Flux network (every Linear of "
        "the double and single blocks); use kohya, and train_blocks to choose blocks",
    ),
    "chroma's t5": (
        "chroma", {"train": {"train_text_encoder": True}},
        "train.train_text_encoder: Chroma's only text encoder is T5, which is not trained "
        "(kohya's default); remove it",
    ),
    "chroma unmasked": (
        "chroma", {"train": {"apply_t5_attn_mask": False}},
        "train.apply_t5_attn_mask: false: Chroma reads T5 with its attention mask (kohya "
        "requires it for Chroma); remove it",
    ),
    "block list length": (
        "sd", {"train": {"block_dims": [4] * 23}},
        "train.block_dims: 23 values; Stable Diffusion 1.x/2.x has 25 blocks in kohya's "
        "indexing, give one value each",
    ),
    "block lr weights": (
        "sd", {"train": {"down_lr_weight": [1.0] * 9}},
        "train.down_lr_weight: 9 weights; give 12 (one per block)",
    ),
    "network type on flux": (
        "flux", {"train": {"network_type": "loha"}},
        "train.network_type: an option of the Stable Diffusion families, and the base model is "
        "flux; remove it",
    ),
    "bucket step": (
        "flux", {"resize": {"bucket_reso_steps": 8}},
        "resize.bucket_reso_steps 8: flux needs bucket sides that are multiples of 16; use 16, "
        "64 or another multiple",
    ),
    "fp8 without bf16": (
        "flux", {"train": {"fp8_base": True}},
        "train.fp8_base: True has no effect with train.mixed_precision: no; use "
        "mixed_precision: bf16, or drop fp8_base",
    ),
    "fp8 and quantized": (
        "flux", {"train": {"fp8_base": True, "quantize_base": "nf4", "mixed_precision": "bf16"}},
        "train.quantize_base: nf4 and train.fp8_base: true both store the frozen weights; "
        "choose one",
    ),
    "block swap on sd1": (
        "sd", {"train": {"blocks_to_swap": 2, "gradient_checkpointing": True}},
        "train.blocks_to_swap: an option of FLUX.1 and Chroma, and the base model is sd1; "
        "remove it",
    ),
    "block swap on the cpu": (
        "flux", {"device": "cpu", "train": {"blocks_to_swap": 2, "gradient_checkpointing": True}},
        "train.blocks_to_swap: swapping blocks between CPU and GPU memory needs a CUDA GPU, and "
        "the device is cpu; remove it",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FLUX_REFUSALS)
def test_flux_and_sd_options_are_refused_on_the_other_family(
    workdir, tmp_path, tiny_flux, tiny_chroma, case
):
    base, override, message = FLUX_REFUSALS[case]
    model = {"flux": str(tiny_flux), "chroma": str(tiny_chroma), "sd": "models/tiny-sd"}[base]
    line = config_error(workdir, tmp_path, {"base_model": model, **override})
    assert line.startswith("loramill: config: datasets.") and line.endswith(message)


def test_a_validation_folder_beside_validation_split_or_without_images_is_refused(
    workdir, tmp_path
):
    folder = workdir / "data" / "wide_bands" / "validation"
    folder.mkdir()
    try:
        assert config_error(workdir, tmp_path, {"train": {"validation_split": 0.2}}) == (
            "loramill: config: datasets.wide_bands.train.validation_split 0.2 has no effect "
            "beside data/wide_bands/validation/, which is what validation measures; drop "
            "validation_split (kohya's name) or the folder"
        )
        assert config_error(workdir, tmp_path, {}) == (
            "loramill: dataset wide_bands: put the validation images in "
            "data/wide_bands/validation/images/ (the validation folder is laid out as a "
            "dataset: images/, optional captions/ and metadata.csv)"
        )
    finally:
        folder.rmdir()

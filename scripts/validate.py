from loramill.reruns.runner import run
from loramill.train.config import run_options
from loramill.train.validation import validate_checkpoints

run(
    snakemake,
    validate_checkpoints,
    checkpoints_dir=snakemake.input.checkpoints,
    resized_dir=snakemake.input.resized,
    captions_jsonl=snakemake.input.captions,
    result_json=snakemake.output.validation,
    plot_png=snakemake.output.plot,
    logdir=snakemake.log.tensorboard,
    base_model=snakemake.params.base_model,
    # where a run meets and where its weights wait are no params (rules/common.smk:
    # train_setting), so no part of the fingerprint either
    config={**snakemake.params.train, **run_options(snakemake.config, snakemake.wildcards.ds)},
    folder=snakemake.params.folder,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
    device=snakemake.params.device,
    family=snakemake.params.base_model_family,
)

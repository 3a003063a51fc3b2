from loramill.config import dataset_config
from loramill.reruns.runner import run
from loramill.train.config import run_options
from loramill.train.validation import validate_checkpoints

# where the weights wait (blocks_to_swap) is no param (rules/common.smk: train_setting)
train = dataset_config(snakemake.config, snakemake.wildcards.ds)["train"]

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
    config={**snakemake.params.train, **run_options(train)},
    folder=snakemake.params.folder,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
    device=snakemake.params.device,
    family=snakemake.params.base_model_family,
)

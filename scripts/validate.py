from loramill.reruns.runner import run
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
    config=snakemake.params.train,
    folder=snakemake.params.folder,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
    device=snakemake.params.device,
    family=snakemake.params.base_model_family,
)

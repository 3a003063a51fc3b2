from loramill.stage import run
from loramill.train import train_lora

run(
    snakemake,
    train_lora,
    resized_dir=snakemake.input.resized,
    captions_jsonl=snakemake.input.captions,
    checkpoints_dir=snakemake.output.checkpoints,
    logdir=snakemake.output.tensorboard,
    base_model=snakemake.params.base_model,
    config=snakemake.params.train,
    dataset=snakemake.wildcards.ds,
    trigger=snakemake.params.trigger,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
)

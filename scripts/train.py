from loramill.reruns.fingerprints import stage_provenance
from loramill.reruns.runner import run
from loramill.train.config import run_options
from loramill.train.loop import train_lora
from loramill.train.state import state_dir

run(
    snakemake,
    train_lora,
    # Resumable state is keyed on what the job receives, so only a run of the same
    # trajectory picks it up.
    from_fingerprint=lambda parts: {
        "state_dir": state_dir(parts, snakemake.params.train),
        "stage": stage_provenance(parts),
    },
    resized_dir=snakemake.input.resized,
    captions_jsonl=snakemake.input.captions,
    # regularization images, when the dataset has some
    reg_resized_dir=next(iter(snakemake.input.reg_resized), None),
    reg_captions_jsonl=next(iter(snakemake.input.reg_captions), None),
    checkpoints_dir=snakemake.output.checkpoints,
    logdir=snakemake.log.tensorboard,
    loss_png=snakemake.output.loss,
    base_model=snakemake.params.base_model,
    # where a run meets and where its weights wait are no params (rules/common.smk:
    # train_setting), so no part of the fingerprint either
    config={**snakemake.params.train, **run_options(snakemake.config, snakemake.wildcards.ds)},
    trigger=snakemake.params.trigger,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
    device=snakemake.params.device,
    family=snakemake.params.base_model_family,
)

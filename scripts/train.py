from loramill.fingerprints import stage_provenance
from loramill.job import run
from loramill.train import train_lora
from loramill.train_state import state_dir

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
    checkpoints_dir=snakemake.output.checkpoints,
    logdir=snakemake.log.tensorboard,
    loss_png=snakemake.output.loss,
    base_model=snakemake.params.base_model,
    config=snakemake.params.train,
    trigger=snakemake.params.trigger,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
    device=snakemake.params.device,
)

from loramill.reruns.fingerprints import stage_provenance
from loramill.reruns.runner import run
from loramill.text.train import text_state_dir, train_text

run(
    snakemake,
    train_text,
    # Resumable state is keyed on what the job receives, so only a run of the same
    # trajectory picks it up.
    from_fingerprint=lambda parts: {
        "state_dir": text_state_dir(parts),
        "stage": stage_provenance(parts),
    },
    train_tokens=snakemake.input.tokens,
    checkpoints_dir=snakemake.output.checkpoints,
    loss_png=snakemake.output.loss,
    language_model=snakemake.params.language_model,
    config=snakemake.params.text["train"],
    device=snakemake.params.device,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
)

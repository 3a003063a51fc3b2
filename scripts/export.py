from loramill.export.job import export_and_verify
from loramill.reruns.runner import run

run(
    snakemake,
    export_and_verify,
    checkpoints_dir=snakemake.input.checkpoints,
    kohya_path=snakemake.output.kohya,
    diffusers_path=snakemake.output.get("diffusers"),  # export_lycoris writes none
    card_path=snakemake.output.card,
    steps_dir=snakemake.output.steps,
    output_name=snakemake.params.name,
    export=snakemake.params.export,
    base_model=snakemake.params.base_model,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
    train=snakemake.params.train,
    # results/<ds>/validation.json, for the datasets with a validation loss
    validation_json=next(iter(snakemake.input.validation), None),
)

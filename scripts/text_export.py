from loramill.reruns.runner import run
from loramill.text.export import export_text

run(
    snakemake,
    export_text,
    checkpoints_dir=snakemake.input.checkpoints,
    out_dir=snakemake.output.adapter,
    name=snakemake.params.name,
    language_model=snakemake.params.language_model,
    settings=snakemake.params.text["export"],
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
)

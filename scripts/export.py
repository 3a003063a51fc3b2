from loramill.export import export_adapter
from loramill.job import run
from loramill.lora import list_checkpoints

run(
    snakemake,
    lambda: export_adapter(
        checkpoint_path=list_checkpoints(snakemake.input.checkpoints)[-1],
        kohya_path=snakemake.output.kohya,
        diffusers_path=snakemake.output.diffusers,
        output_name=snakemake.params.name,
    ),
)

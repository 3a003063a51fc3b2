from loramill.export import export_adapter
from loramill.lora import list_checkpoints
from loramill.stage import run

run(
    snakemake,
    lambda: export_adapter(
        checkpoint_path=list_checkpoints(snakemake.input.checkpoints)[-1],
        kohya_path=snakemake.output.kohya,
        diffusers_path=snakemake.output.diffusers,
        output_name=snakemake.wildcards.ds,
    ),
)

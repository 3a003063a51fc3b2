from loramill.report_pages import write_overview
from loramill.reruns.runner import run

run(
    snakemake,
    write_overview,
    name=snakemake.wildcards.ds,
    overview_path=snakemake.output.overview,
    loss_png=snakemake.input.loss,
    grid_png=snakemake.input.get("grid"),
)

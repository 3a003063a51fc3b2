from loramill.resize import resize_dataset
from loramill.stage import run

run(
    snakemake,
    resize_dataset,
    images_dir=snakemake.input.images,
    out_dir=snakemake.output.resized,
    resolution=snakemake.params.resolution,
)

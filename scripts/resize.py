from loramill.job import run
from loramill.resize import resize_dataset

run(
    snakemake,
    resize_dataset,
    images_dir=snakemake.input.images,
    out_dir=snakemake.output.resized,
    resolution=snakemake.params.resolution,
)

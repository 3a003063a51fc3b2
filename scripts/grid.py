from pathlib import Path

from loramill.grid.build import render_grid, with_caption_prompts
from loramill.reruns.runner import run
from loramill.train.ranking import with_best_checkpoints

run(
    snakemake,
    lambda: render_grid(
        base_model=snakemake.params.base_model,
        # every step's adapter: the export's kohya files, what users load as they load them
        # (FLUX.1 and Chroma: the training checkpoints, rules/common.smk grid_adapters)
        adapters=sorted(Path(snakemake.input.adapters).glob("*.safetensors")),
        settings=with_best_checkpoints(
            with_caption_prompts(
                snakemake.params.grid, snakemake.input.captions, snakemake.wildcards.ds
            ),
            next(iter(snakemake.input.validation), None),  # grid.checkpoints: best:N
        ),
        out_png=snakemake.output.grid,
        out_json=snakemake.output.cells,
        pages_dir=snakemake.output.pages,
        name=snakemake.wildcards.ds,  # for the log only: a renamed dataset keeps its grid
        prompt_reading=snakemake.params.prompt_reading,
        allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
        device=snakemake.params.device,
    ),
)

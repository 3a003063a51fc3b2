from loramill.grid import render_grid
from loramill.job import run
from loramill.lora import list_checkpoints

grid = snakemake.params.grid
run(
    snakemake,
    lambda: render_grid(
        base_model=snakemake.params.base_model,
        checkpoints=list_checkpoints(snakemake.input.checkpoints),
        strengths=grid["strengths"],
        prompts=snakemake.params.prompts,
        out_png=snakemake.output.grid,
        out_json=snakemake.output.cells,
        seed=grid["seed"],
        num_inference_steps=grid["num_inference_steps"],
        guidance_scale=grid["guidance_scale"],
        resolution=snakemake.params.resolution,
        clip_skip=snakemake.params.clip_skip,
        max_token_length=snakemake.params.max_token_length,
        negative_prompt=grid["negative_prompt"],
        dtype=grid["dtype"],
        allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
        device=snakemake.params.device,
    ),
)

# Evaluation: XYZ grid of checkpoint step × LoRA strength × prompt.


rule grid:
    input:
        checkpoints=keyed("results/{ds}/checkpoints"),
        gate=gate("grid"),
    output:
        grid="grids/{ds}.png",
        cells="grids/{ds}.json",
        done=done("grid"),
    log:
        "logs/grid/{ds}.log",
    benchmark:
        "benchmarks/grid/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=model_mem_mb(training=False),
        gpu=gpus,
    params:
        base_model=lambda wildcards: config["base_model"],
        allow_unsafe_weights=config["allow_unsafe_weights"],
        grid=setting("grid"),
        prompts=lambda wildcards: grid_prompts(
            DATASETS[wildcards.ds]["grid"]["prompts"],
            DATASETS[wildcards.ds]["trigger"],
        ),
        resolution=setting("resize", "resolution"),
        # the caption encoding the adapter was trained with
        clip_skip=setting("train", "clip_skip"),
        max_token_length=setting("train", "max_token_length"),
        device=config["device"],
    script:
        "../scripts/grid.py"

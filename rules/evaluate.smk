# Evaluation: the X/Y/Z grid (default: checkpoint step × LoRA strength × prompt).


rule grid:
    input:
        # the export's kohya file of every checkpoint (<ds>-NNNNNN.safetensors, the last one
        # also exports/<ds>.safetensors): the grid shows what users load, and follows the export
        # (FLUX.1 and Chroma: the training checkpoints, see grid_adapters)
        adapters=keyed(grid_adapters),
        # the training captions, only for a grid that sets no prompts
        captions=keyed(grid_captions),
        gate=gate("grid"),
    output:
        grid="grids/{ds}.png",
        cells="grids/{ds}.json",
        # every page, page-N.png (a grid over max_megapixels has several; the first is
        # grids/<ds>.png too)
        pages=report(
            directory("grids/{ds}-pages"),
            patterns=["{page}.png"],
            caption="../report/grid.rst",
            category="Grids",
            labels={"dataset": "{ds}", "page": "{page}"},
        ),
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
        base_model=setting("base_model"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        grid=lambda wildcards: grid_settings(
            DATASETS[wildcards.ds]["grid"],
            DATASETS[wildcards.ds]["trigger"],
            DATASETS[wildcards.ds]["resize"]["resolution"],
            DATASETS[wildcards.ds]["family"],
        ),
        # how the adapter was trained to read captions (SD and SDXL: CLIP's layer and length;
        # FLUX.1 and Chroma: T5's length and mask)
        prompt_reading=setting("train", PROMPT_OPTIONS),
        device=config["device"],
    script:
        "../scripts/grid.py"

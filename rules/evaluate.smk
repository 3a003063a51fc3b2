# Evaluation: the X/Y/Z grid (default: checkpoint step × LoRA strength × prompt).


rule grid:
    input:
        # the export's kohya file of every checkpoint (<ds>-NNNNNN.safetensors, the last one
        # also exports/<ds>.safetensors): the grid shows what users load, and follows the export
        # (FLUX.1 and Chroma: the training checkpoints, see grid_adapters)
        adapters=keyed(grid_adapters),
        # the training captions, only for a grid that sets no prompts
        captions=keyed(grid_captions),
        # the validation loss per checkpoint, only for grid.checkpoints: best:N
        validation=keyed(grid_validation),
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


# The validation loss of every checkpoint, on held-out images (train.validation_split) or the
# dataset's validation folder: a stage of its own, so new validation images train nothing.
rule validate:
    input:
        checkpoints=keyed("results/{ds}/checkpoints"),
        resized=keyed(validation_input("resized")),
        captions=keyed(validation_input("captions.jsonl")),
        gate=gate("validate"),
    output:
        validation="results/{ds}/validation.json",
        plot=report(
            "results/{ds}/validation.png",
            caption="../report/validation.rst",
            category="Validation loss",
            labels={"dataset": "{ds}"},
        ),
        done=done("validate"),
    log:
        "logs/validate/{ds}.log",
        tensorboard=directory("results/{ds}/tensorboard-validation"),
    benchmark:
        "benchmarks/validate/{ds}.tsv"
    wildcard_constraints:
        ds=one_of(VALIDATED),
    conda:
        ENV
    resources:
        mem_mb=model_mem_mb(training=False),
        gpu=gpus,
    params:
        base_model=setting("base_model"),
        base_model_family=setting("base_model_family"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        train=validate_setting,
        folder=validation_folder,
        device=config["device"],
    script:
        "../scripts/validate.py"

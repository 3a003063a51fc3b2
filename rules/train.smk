# Training and export.


rule train:
    input:
        resized="results/{ds}/resized",
        captions="results/{ds}/captions.jsonl",
        base_model=base_model_files(),
    output:
        checkpoints=directory("results/{ds}/checkpoints"),
        tensorboard=directory("results/{ds}/tensorboard"),
    log:
        "logs/train/{ds}.log",
    benchmark:
        "benchmarks/train/{ds}.tsv"
    conda:
        ENV
    threads: lambda wildcards: DATASETS[wildcards.ds]["train"]["threads"]
    resources:
        mem_mb=4000,
    params:
        base_model=lambda wildcards: config["base_model"],
        allow_unsafe_weights=config["allow_unsafe_weights"],
        train=setting("train"),
        trigger=lambda wildcards: DATASETS[wildcards.ds]["trigger"],
    script:
        "../scripts/train.py"


rule export:
    input:
        checkpoints="results/{ds}/checkpoints",
    output:
        kohya="exports/{ds}.safetensors",
        diffusers="exports/{ds}.diffusers.safetensors",
    log:
        "logs/export/{ds}.log",
    conda:
        ENV
    script:
        "../scripts/export.py"

# Data preparation: resize → auto-caption → merge with human caption edits.


rule resize:
    input:
        images=dataset_files("images"),
    output:
        resized=directory("results/{ds}/resized"),
    log:
        "logs/resize/{ds}.log",
    benchmark:
        "benchmarks/resize/{ds}.tsv"
    conda:
        ENV
    params:
        images_dir=lambda wildcards: dataset_dir(wildcards, "images"),
        resolution=setting("resize", "resolution"),
    script:
        "../scripts/resize.py"


rule caption:
    input:
        resized="results/{ds}/resized",
    output:
        auto_captions="results/{ds}/auto_captions.jsonl",
    log:
        "logs/caption/{ds}.log",
    benchmark:
        "benchmarks/caption/{ds}.tsv"
    conda:
        ENV
    params:
        caption=setting("caption"),
        trigger=lambda wildcards: DATASETS[wildcards.ds]["trigger"],
        allow_unsafe_weights=config["allow_unsafe_weights"],
    script:
        "../scripts/caption.py"


rule merge_captions:
    input:
        auto_captions="results/{ds}/auto_captions.jsonl",
        human_edits=dataset_files("captions", "*.txt"),
    output:
        captions="results/{ds}/captions.jsonl",
        report="results/{ds}/caption_report.json",
    log:
        "logs/merge_captions/{ds}.log",
    conda:
        ENV
    params:
        human_dir=lambda wildcards: dataset_dir(wildcards, "captions"),
        trigger=lambda wildcards: DATASETS[wildcards.ds]["trigger"],
    script:
        "../scripts/merge_captions.py"

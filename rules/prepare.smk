# Data preparation: resize → auto-caption → merge with human caption edits.


rule resize:
    input:
        images=keyed(dataset_images),
        # loss masks, beside images/ (train.masked_loss): read with them
        masks=keyed(dataset_masks),
        gate=gate("resize", "image", IMAGE_SET_TASK),
    output:
        resized=directory("results/{ds}/resized"),
        quarantine="results/{ds}/quarantine.csv",
        done=done("resize"),
    log:
        "logs/resize/{ds}.log",
    benchmark:
        "benchmarks/resize/{ds}.tsv"
    conda:
        ENV
    threads: lambda wildcards: DATASETS[wildcards.ds]["resize"]["threads"]
    params:
        # threads only spread the work: the pixels do not depend on them
        settings=lambda wildcards: {
            k: v for k, v in DATASETS[wildcards.ds]["resize"].items() if k != "threads"
        },
    script:
        "../scripts/resize.py"


rule caption:
    input:
        resized=keyed("results/{ds}/resized"),
        gate=gate("caption", "image", IMAGE_SET_TASK),
    output:
        auto_captions="results/{ds}/auto_captions.jsonl",
        done=done("caption"),
    log:
        "logs/caption/{ds}.log",
    benchmark:
        "benchmarks/caption/{ds}.tsv"
    conda:
        ENV
    resources:
        gpu=lambda wildcards: gpus(wildcards) if captions_with_model(wildcards) else 0,
    params:
        caption=setting("caption"),
        caption_model=caption_model,
        trigger=setting("trigger"),
        dataset=name_if_captioned,
        allow_unsafe_weights=config["allow_unsafe_weights"],
        device=config["device"],
    script:
        "../scripts/caption.py"


rule merge_captions:
    input:
        auto_captions=keyed("results/{ds}/auto_captions.jsonl"),
        edits=keyed(caption_edits),
        metadata=keyed(metadata_csv),
        gate=gate("merge_captions", "image", IMAGE_SET_TASK),
    output:
        captions="results/{ds}/captions.jsonl",
        report="results/{ds}/caption_report.json",
        report_csv="results/{ds}/caption_report.csv",
        sidecars=directory("results/{ds}/kohya_captions"),
        done=done("merge_captions"),
    log:
        "logs/merge_captions/{ds}.log",
    conda:
        ENV
    params:
        trigger=setting("trigger_words"),
        settings=setting("merge"),
        # its tokenizer counts caption tokens
        base_model=setting("base_model"),
    script:
        "../scripts/merge_captions.py"

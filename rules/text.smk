# Text datasets (task: text): jsonl records → tokens → LoRA → adapter folder + GGUF, evaluation.


rule text_prepare:
    input:
        records=keyed(lambda wildcards: dataset_dir(wildcards, "train.jsonl")),
        # a dataset's own evaluation records, when it has them (else a hold-out of train)
        eval_records=keyed(eval_jsonl),
        gate=gate("text_prepare", "text"),
    output:
        train="results/{ds}/tokens/train.jsonl",
        eval="results/{ds}/tokens/eval.jsonl",
        summary="results/{ds}/tokens/summary.json",
        done=done("text_prepare"),
    log:
        "logs/text_prepare/{ds}.log",
    conda:
        ENV
    params:
        text=text_setting("prepare"),
        # its tokenizer: the base model is fingerprinted by content (loramill.text.language_model)
        language_model=setting("base_model"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
    script:
        "../scripts/text_prepare.py"


rule text_train:
    input:
        tokens=keyed("results/{ds}/tokens/train.jsonl"),
        gate=gate("text_train", "text"),
    output:
        checkpoints=directory("results/{ds}/adapters"),
        loss=report(
            "results/{ds}/adapter_loss.png",
            caption="../report/adapter_loss.rst",
            category="Loss curves",
            labels={"dataset": "{ds}"},
        ),
        done=done("text_train"),
    log:
        "logs/text_train/{ds}.log",
    benchmark:
        "benchmarks/text_train/{ds}.tsv"
    conda:
        ENV
    threads: lambda wildcards: DATASETS[wildcards.ds]["text"]["train"]["threads"]
    resources:
        mem_mb=text_mem_mb(training=True),
        gpu=gpus,
    params:
        language_model=setting("base_model"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        text=text_setting("train"),
        device=config["device"],
    script:
        "../scripts/text_train.py"


rule text_export:
    input:
        checkpoints=keyed("results/{ds}/adapters"),
        gate=gate("text_export", "text"),
    output:
        # adapter folder, provenance, model card, <ds>.gguf, merged/ (loramill.text.export)
        adapter=directory("exports/{ds}"),
        done=done("text_export"),
    log:
        "logs/text_export/{ds}.log",
    conda:
        ENV
    resources:
        mem_mb=text_mem_mb(training=False),
    params:
        name=lambda wildcards: wildcards.ds,  # the adapter's name in its card and GGUF
        language_model=setting("base_model"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        text=text_setting("export"),
    script:
        "../scripts/text_export.py"


rule text_evaluate:
    input:
        checkpoints=keyed("results/{ds}/adapters"),
        tokens=keyed("results/{ds}/tokens/eval.jsonl"),
        gate=gate("text_evaluate", "text"),
    output:
        markdown="evaluations/{ds}.md",
        table="evaluations/{ds}.json",
        html=report(
            "evaluations/{ds}.html",
            caption="../report/evaluation.rst",
            category="Text evaluations",
            labels={"dataset": "{ds}"},
        ),
        done=done("text_evaluate"),
    log:
        "logs/text_evaluate/{ds}.log",
    benchmark:
        "benchmarks/text_evaluate/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=text_mem_mb(training=False),
        gpu=gpus,
    params:
        language_model=setting("base_model"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        text=text_setting("evaluate"),
        device=config["device"],
    script:
        "../scripts/text_evaluate.py"

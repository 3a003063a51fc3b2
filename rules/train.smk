# Training and export.


rule train:
    input:
        resized=keyed("results/{ds}/resized"),
        captions=keyed("results/{ds}/captions.jsonl"),
        # regularization images, prepared as a dataset's (train.reg_data, data/<ds>/reg/)
        reg_resized=keyed(reg_input("resized")),
        reg_captions=keyed(reg_input("captions.jsonl")),
        gate=gate("train"),
    output:
        checkpoints=directory("results/{ds}/checkpoints"),
        loss=report(
            "results/{ds}/loss.png",
            caption="../report/loss.rst",
            category="Loss curves",
            labels={"dataset": "{ds}"},
        ),
        done=done("train"),
    log:
        "logs/train/{ds}.log",
        # the run's log, kept with it in the run-cache but no part of its result
        tensorboard=directory("results/{ds}/tensorboard"),
    benchmark:
        "benchmarks/train/{ds}.tsv"
    conda:
        ENV
    # threads per process, times train.num_processes (and one GPU each)
    threads:
        lambda wildcards: train_processes(wildcards)
        * DATASETS[wildcards.ds]["train"]["threads"]
    resources:
        mem_mb=model_mem_mb(training=True),
        gpu=lambda wildcards: gpus(wildcards) * train_processes(wildcards),
    params:
        # a folder or a hub id, so a parameter rather than an input: its content is part of
        # the stage's fingerprint
        base_model=setting("base_model"),
        base_model_family=setting("base_model_family"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        train=train_setting,
        trigger=setting("trigger"),
        device=config["device"],
    script:
        "../scripts/train.py"


# What every export writes: the kohya file, the model card and a kohya file per checkpoint.
EXPORT_OUTPUTS = dict(
    kohya="exports/{ds}.safetensors",
    card="exports/{ds}.md",
    # the card as a web page, written beside the .md (loramill.export.model_card): the report
    # opens HTML in place, a Markdown result only as a download link
    card_html=report(
        "exports/{ds}.html",
        caption="../report/card.rst",
        category="Model cards",
        labels={"dataset": "{ds}"},
    ),
    # a kohya file of every checkpoint: <ds>-NNNNNN.safetensors
    steps=directory("exports/{ds}-steps"),
    done=done("export"),
)


rule export:
    input:
        checkpoints=keyed("results/{ds}/checkpoints"),
        # the validation loss per checkpoint: the card's, and export.checkpoint: best's
        validation=keyed(validation_result),
        gate=gate("export"),
    output:
        **EXPORT_OUTPUTS,
        diffusers="exports/{ds}.diffusers.safetensors",
    log:
        "logs/export/{ds}.log",
    wildcard_constraints:
        ds=one_of(sorted(set(IMAGE_DATASETS) - set(NO_DIFFUSERS))),
    conda:
        ENV
    resources:
        # verification loads the base model and the exports into it
        mem_mb=model_mem_mb(training=False),
    params:
        name=lambda wildcards: wildcards.ds,  # the adapter's name in its metadata
        export=setting("export"),
        # what the exports are checked against: the base model and the network trained on it
        base_model=setting("base_model"),
        allow_unsafe_weights=config["allow_unsafe_weights"],
        train=train_setting,
    script:
        "../scripts/export.py"


# The same stage for a network diffusers cannot load (LoHa, LoKr, DoRA): no diffusers file.
use rule export as export_lycoris with:
    output:
        **EXPORT_OUTPUTS,
    wildcard_constraints:
        ds=one_of(NO_DIFFUSERS),

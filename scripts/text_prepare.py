from loramill.reruns.runner import run
from loramill.text.prepare import prepare_text

run(
    snakemake,
    prepare_text,
    train_jsonl=snakemake.input.records,
    eval_jsonl=list(snakemake.input.eval_records),
    train_tokens=snakemake.output.train,
    eval_tokens=snakemake.output.eval,
    summary_json=snakemake.output.summary,
    settings=snakemake.params.text["prepare"],
    language_model=snakemake.params.language_model,
)

from loramill.job import run
from loramill.merge import merge_captions

run(
    snakemake,
    merge_captions,
    auto_jsonl=snakemake.input.auto_captions,
    human_dir=next(iter(snakemake.input.edits), None),
    out_jsonl=snakemake.output.captions,
    report_json=snakemake.output.report,
    trigger=snakemake.params.trigger,
)

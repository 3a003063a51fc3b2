from loramill.merge import merge_captions
from loramill.stage import run

run(
    snakemake,
    merge_captions,
    auto_jsonl=snakemake.input.auto_captions,
    human_dir=snakemake.params.human_dir,
    out_jsonl=snakemake.output.captions,
    report_json=snakemake.output.report,
    trigger=snakemake.params.trigger,
)

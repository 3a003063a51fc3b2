from loramill.captions.merge import merge_captions
from loramill.reruns.runner import run

run(
    snakemake,
    merge_captions,
    auto_jsonl=snakemake.input.auto_captions,
    captions_dir=next(iter(snakemake.input.edits), None),
    metadata_csv=next(iter(snakemake.input.metadata), None),
    out_jsonl=snakemake.output.captions,
    report_json=snakemake.output.report,
    report_csv=snakemake.output.report_csv,
    sidecars_dir=snakemake.output.sidecars,
    trigger=snakemake.params.trigger,
    settings=snakemake.params.settings,
    base_model=snakemake.params.base_model,
    name=snakemake.wildcards.ds,
)

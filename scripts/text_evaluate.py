from loramill.reruns.runner import run
from loramill.text.evaluate import evaluate_text

run(
    snakemake,
    evaluate_text,
    checkpoints_dir=snakemake.input.checkpoints,
    eval_tokens=snakemake.input.tokens,
    markdown_path=snakemake.output.markdown,
    json_path=snakemake.output.table,
    html_path=snakemake.output.html,
    language_model=snakemake.params.language_model,
    settings=snakemake.params.text["evaluate"],
    device=snakemake.params.device,
    allow_unsafe_weights=snakemake.params.allow_unsafe_weights,
)

from loramill.captions.autocaption import caption_dataset
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.reruns.runner import run

run(
    snakemake,
    caption_dataset,
    resized_dir=snakemake.input.resized,
    out_jsonl=snakemake.output.auto_captions,
    config={
        **snakemake.params.caption,
        "allow_unsafe_weights": snakemake.params.allow_unsafe_weights,
        "device": snakemake.params.device,
    },
    dataset=snakemake.params.dataset,
    trigger=snakemake.params.trigger,
    hashes=HashCache(DEFAULT_DB),
    name=snakemake.wildcards.ds,
)

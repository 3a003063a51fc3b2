from loramill.hashing import DEFAULT_DB, HashCache, hash_value
from loramill.prepare.resize import resize_dataset
from loramill.reruns.runner import run

run(
    snakemake,
    resize_dataset,
    # Per-image results are cached across runs: keyed on the stage's code too, so a change
    # to how pixels are made redoes them.
    from_fingerprint=lambda parts: {"code": hash_value(parts["code"])},
    images_dir=snakemake.input.images,
    out_dir=snakemake.output.resized,
    quarantine_csv=snakemake.output.quarantine,
    settings=snakemake.params.settings,
    name=snakemake.wildcards.ds,
    threads=snakemake.threads,
    hashes=HashCache(DEFAULT_DB),  # the planner hashed the images already
)

# loramill: folders of images in, reproducible Stable Diffusion LoRA adapters out.
#
#   snakemake --cores 1 train_all     every dataset: resize → caption → merge → train → export → grid
#
# Per dataset (data/<ds>/images + optional human edits in data/<ds>/captions):
#   results/<ds>/resized/               PNGs at their aspect-ratio bucket + manifest.json
#   results/<ds>/quarantine.csv         files left out, with the reason (file,reason)
#   results/<ds>/auto_captions.jsonl    captioner output
#   results/<ds>/captions.jsonl         training captions (human edits win, trigger prepended)
#   results/<ds>/checkpoints/           step-NNNNNN.safetensors (diffusers LoRA format)
#   results/<ds>/loss.png               loss curve (TensorBoard logs in results/<ds>/tensorboard)
#   exports/<ds>.safetensors            kohya format for AUTOMATIC1111 / ComfyUI / diffusers
#   exports/<ds>.diffusers.safetensors  diffusers format
#   exports/<ds>.md                     model card: use, settings, tags, grid, provenance
#   exports/<ds>-steps/                 <ds>-NNNNNN.safetensors: kohya format, every checkpoint
#   grids/<ds>.png                      XYZ grid: checkpoint step × strength × prompt
#   grids/<ds>.json                     every cell: settings, adapter hash, box, page
#   grids/<ds>-pages/                   page-N.png: the grid's pages (more than one past
#                                       grid.max_megapixels)
#
#   snakemake --report report.html train_all    one page: grids, loss curves, model cards


from snakemake.utils import min_version

min_version("9.27")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


# ---- targets ----------------------------------------------------------------------------


rule train_all:
    default_target: True
    input:
        exports=expand("exports/{ds}.safetensors", ds=DATASETS),
        grids=expand("grids/{ds}.png", ds=DATASETS),


rule exports:
    input:
        expand("exports/{ds}.safetensors", ds=DATASETS),


rule grids:
    input:
        expand("grids/{ds}.png", ds=DATASETS),


# ---- stages -----------------------------------------------------------------------------


include: "rules/prepare.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"

# loramill: folders of images (or jsonl text) in, reproducible LoRA adapters out.
#
#   snakemake --cores 1 train_all     every dataset: resize → caption → merge → train → export → grid
#                                     (task: text: text_prepare → text_train → text_export,
#                                     text_evaluate)
#
# Per dataset (data/<ds>/images + optional human edits in data/<ds>/captions):
#   results/<ds>/resized/               PNGs at their aspect-ratio bucket + manifest.json
#   results/<ds>/quarantine.csv         files left out, with the reason (file,reason)
#   results/<ds>/auto_captions.jsonl    captioner output
#   results/<ds>/captions.jsonl         training captions (human edits win, trigger prepended)
#   results/<ds>/caption_report.json    edits applied / stale / orphaned, tag frequency
#   results/<ds>/caption_report.csv     each stale or orphaned caption edit
#   results/<ds>/kohya_captions/        kohya .txt sidecars (merge.write_sidecars), for other
#                                       trainers
#   results/<ds>/checkpoints/           step-NNNNNN.safetensors (diffusers LoRA format)
#   results/<ds>/loss.png               loss curve (TensorBoard logs in results/<ds>/tensorboard)
#   results/<ds>/validation.json        validation loss per checkpoint (train.validation_split
#                                       or data/<ds>/validation/; rule validate)
#   results/<ds>/validation.png         the same as a plot, beside the training loss
#   results/<ds>.validation/, results/<ds>.reg/
#                                       a validation folder's, regularization images' resized/,
#                                       captions.jsonl …: prepared as a dataset's
#   exports/<ds>.safetensors            kohya format: AUTOMATIC1111 / ComfyUI / kohya / diffusers
#   exports/<ds>.diffusers.safetensors  diffusers format: diffusers / ComfyUI (not AUTOMATIC1111;
#                                       none for LoHa, LoKr, DoRA: rule export_lycoris)
#   exports/<ds>.md                     model card: use, settings, tags, grid, provenance
#   exports/<ds>.html                   the model card as a web page (for the report)
#   exports/<ds>-steps/                 <ds>-NNNNNN.safetensors: kohya format, every checkpoint
#   grids/<ds>.png                      XYZ grid: checkpoint step × strength × prompt, drawn
#                                       from the exports/<ds>-steps/ files
#   grids/<ds>.json                     every cell: settings, adapter hash, box, page
#   grids/<ds>-pages/                   page-N.png: the grid's pages (more than one past
#                                       grid.max_megapixels)
#
# Per text dataset (data/<ds>/train.jsonl, optional eval.jsonl):
#   results/<ds>/tokens/train.jsonl     token ids and labels per example
#   results/<ds>/tokens/eval.jsonl      the same for the eval records
#   results/<ds>/tokens/summary.json    records, examples, tokens, truncated, dropped per split
#   results/<ds>/adapters/              step-NNNNNN/: peft adapter folders
#   results/<ds>/adapter_loss.png       loss curve
#   exports/<ds>/                       peft adapter + provenance + model card, <ds>.gguf
#                                       (llama.cpp), merged/ (text.export.merged)
#   evaluations/<ds>.md                 per checkpoint: eval loss, perplexity, generations
#   evaluations/<ds>.json               the same as data
#   evaluations/<ds>.html               the same as a web page (for the report)
#
# Every dataset: results/<ds>/overview.html, its grid and loss curve on the report's first page
# (made by make report).
#
# The rules (rules/*.smk) are the source of these lists; tests/test_outputs_documented.py holds
# this header and the README's table to them.
#
#   make report                       report.html, one page: grids, loss curves, model cards,
#                                     text evaluations (overview pages, then snakemake --report)


from snakemake.utils import min_version

min_version("9.27")

CONFIG_FILE = "config/config.yaml"


include: "rules/setup.smk"


configfile: CONFIG_FILE


report: "report/workflow.rst"


include: "rules/common.smk"


# ---- targets ----------------------------------------------------------------------------


rule train_all:
    default_target: True
    input:
        exports=expand("exports/{ds}.safetensors", ds=IMAGE_DATASETS),
        grids=expand("grids/{ds}.png", ds=IMAGE_DATASETS),
        validations=expand("results/{ds}/validation.json", ds=VALIDATED),
        text_exports=expand("exports/{ds}", ds=TEXT_DATASETS),
        evaluations=expand("evaluations/{ds}.html", ds=TEXT_DATASETS),


rule exports:
    input:
        expand("exports/{ds}.safetensors", ds=IMAGE_DATASETS),
        expand("exports/{ds}", ds=TEXT_DATASETS),


rule grids:
    input:
        expand("grids/{ds}.png", ds=IMAGE_DATASETS),


# The report's target (make report): what train_all made and each dataset's overview page
rule report_pages:
    input:
        rules.train_all.input,
        expand("results/{ds}/overview.html", ds=IMAGE_DATASETS + TEXT_DATASETS),


# ---- stages -----------------------------------------------------------------------------


include: "rules/prepare.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/text.smk"
include: "rules/report.smk"

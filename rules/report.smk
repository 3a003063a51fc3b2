# The report's first screen (report/workflow.rst, loramill.report_pages): per dataset, its grid
# (a thumbnail) and loss curve in one HTML fragment. Made by `make report` (target
# report_pages), not by train_all: a clone with the published results plans nothing. Not
# content-keyed: a cheap page redone whenever the grid or loss curve it shows is newer.


localrules:
    overview,


rule overview:
    input:
        # a text dataset has a loss curve and no grid
        unpack(
            lambda wildcards: (
                {"loss": f"results/{wildcards.ds}/adapter_loss.png"}
                if DATASETS[wildcards.ds]["task"] == "text"
                else {
                    "loss": f"results/{wildcards.ds}/loss.png",
                    "grid": f"grids/{wildcards.ds}.png",
                }
            )
        ),
    output:
        overview=report(
            "results/{ds}/overview.html",
            caption="../report/overview.rst",
            category="Overview",
            labels={"dataset": "{ds}"},
        ),
    log:
        "logs/overview/{ds}.log",
    conda:
        ENV
    script:
        "../scripts/overview.py"

"""``python -m loramill``: the commands a user runs, one line each.

The workflow itself runs with Snakemake (``make demo``); these are the commands around it.
Each tool module here answers ``--help`` with its options. A module of the package with a
``main`` must be listed in ``COMMANDS`` (tests/test_commands.py checks it), so a new tool
cannot go without a line here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Tool modules (python -m loramill.<name>): their arguments, and what they do.
COMMANDS = {
    "captions.seed_edits": ("DATASET", "start caption review: auto captions into metadata.csv"),
    "captions.review": ("DATASET", "review and edit captions in the browser (a local page)"),
    "publish": ("[DATASET]", "push changed exports, grids and data/ to your DVC remote"),
    "reruns.run_cache": ("gc", "free disk: drop run-cache entries no lock references"),
    "grid.render": ("gc", "free disk: drop cached grid cells no grid shows"),
    "models.single_file": ("CKPT OUT_DIR", "an A1111/ComfyUI checkpoint into a base_model folder"),
}
# Modules run as ``python -m`` by the workflow or the tests, not by users.
INTERNAL = {
    "train.distributed": "a worker of a multi-process training, started by the train job",
    "demo.images": "draws the demo image datasets and test fixtures",
    "demo.text": "writes the demo text dataset",
}
# Snakemake targets people run besides train_all.
WORKFLOW = {
    "snakemake --cores 1 train_all": "train every dataset (what make demo runs)",
    "snakemake --cores 1 results/<ds>/captions.jsonl": "caption a dataset, not train it",
}
MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"
START = ("demo", "test")  # the README's two commands


def make_targets(makefile: Path = MAKEFILE) -> dict[str, str]:
    """``{target: description}`` from the Makefile's ``## `` lines, each right above its
    target (what ``make help`` prints too, so each is written once)."""
    targets, described = {}, None
    try:
        lines = makefile.read_text(encoding="utf-8").splitlines()
    except OSError:  # an installed copy without the project around it
        return {}
    for line in lines:
        if line.startswith("## "):
            described = line[3:].strip()
            continue
        target = re.match(r"([A-Za-z][\w-]*):", line)
        if target and described:
            targets[target[1]] = described
        described = None
    return targets


def usage() -> str:
    targets = make_targets()
    tools = {f"python -m loramill.{m} {args}": what for m, (args, what) in COMMANDS.items()}
    sections = {
        "Start here, in the project folder:": {f"make {t}": targets.get(t, "") for t in START},
        "The workflow (after make install; source .venv/bin/activate):": WORKFLOW,
        "Tools (each answers --help):": tools,
    }
    lines = ["loramill: image folders into LoRA adapters with Snakemake.", ""]
    for title, commands in sections.items():
        width = max(map(len, commands))
        lines += [title, *(f"  {c:<{width}}  {what}" for c, what in commands.items()), ""]
    lines.append("make help lists every make target; README.md tells the rest.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] not in ("-h", "--help", "help"):
        print(f"loramill: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    print(usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())

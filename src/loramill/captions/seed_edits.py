"""Start human caption review from the drafts: append the current auto captions to a
dataset's ``metadata.csv`` for every image that has no edit yet.

Existing rows are never changed or reordered, so the git diff shows additions only; a new
file gets the header ``filename,prompt,mode,image_sha256``. Each added row records the image's
sha256, so an edit of an image that later changes is reported as stale. Images edited by a
sidecar in ``captions/`` are skipped too. Run the caption stage first.

    python -m loramill.captions.seed_edits DATASET [DATASET ...]      (make seed-edits DS=DATASET)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import yaml

from loramill import LoramillError
from loramill.captions.edits import COLUMNS, read_edits
from loramill.config import dataset_config
from loramill.dataset_files import MANIFEST, METADATA, match_key
from loramill.files import read_jsonl


def edit_name(source: str, resized: str) -> str:
    """The name an edit row gives an image: its own file name, or the resized name when the
    image sits in a kohya repeats folder (``images/5_sks dog/a.png`` is ``sks dog__a.png``)."""
    own = Path(source).name
    return own if match_key(own) == match_key(resized) else resized


def drafts(results: Path) -> list[dict[str, str]]:
    """Per source image (``name`` in ``images/``): its auto caption and sha256."""
    auto = results / "auto_captions.jsonl"
    manifest = results / "resized" / MANIFEST
    if not auto.is_file() or not manifest.is_file():
        raise LoramillError(f"{auto}: missing; run the caption stage first")
    sources = {e["file"]: e["source"] for e in json.loads(manifest.read_text())["images"]}
    return [
        {
            "filename": edit_name(sources.get(r["image"], r["image"]), r["image"]),
            "prompt": r["caption"],
            "image_sha256": r.get("image_sha256", ""),
        }
        for r in read_jsonl(auto)
    ]


def seed(dataset_root: Path, results: Path) -> int:
    """Append rows for unedited images; the number appended."""
    table = dataset_root / METADATA
    edits = read_edits(table, dataset_root / "captions")  # also checks the file as it is
    new = [d for d in drafts(results) if match_key(d["filename"]) not in edits and d["prompt"]]
    if not new:
        return 0
    existing = table.read_bytes() if table.is_file() else b""
    # utf-8-sig: a byte-order mark (Excel's) is no part of the first column's name
    text = existing.decode("utf-8-sig")
    header = [c.strip() for c in next(csv.reader(io.StringIO(text)))] if existing else list(COLUMNS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not existing:
        writer.writerow(header)
    writer.writerows([row.get(column, "") for column in header] for row in new)
    separator = b"" if not existing or existing.endswith(b"\n") else b"\n"
    with open(table, "ab") as handle:  # append only: what is there stays byte for byte
        handle.write(separator + buffer.getvalue().encode("utf-8"))
    return len(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loramill.captions.seed_edits", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("datasets", nargs="+", metavar="DATASET", help="a dataset to review")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path("config/config.yaml").read_text())
    try:
        for ds in args.datasets:
            if ds not in (config.get("datasets") or {}):
                raise LoramillError(f"{ds}: not a dataset of config/config.yaml")
            root = Path(dataset_config(config, ds)["path"])
            added = seed(root, Path("results") / ds)
            print(f"{root / METADATA}: {added} row(s) added")
    except LoramillError as error:
        print(f"loramill: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

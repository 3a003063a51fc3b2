"""What the caption review page shows of a dataset, from what the workflow wrote and the edits.

Per image (the resize stage's manifest): its thumbnail's source (the resized file), bucket,
auto caption (the caption stage's), human edit (``metadata.csv`` or a sidecar, read by the
merge stage's reader) and the caption training will use, made by the merge stage's own rules
(loramill.captions.merge_rules) with the dataset's trigger words and merge settings. Besides:
the quarantined files with their reasons, and the stale and orphaned edits, as
``caption_report`` lists them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.captions.edits import MODES, Edit, with_sidecars
from loramill.captions.merge import edit_problems
from loramill.captions.merge_rules import Rules, training_caption
from loramill.captions.review.table import Change, Table
from loramill.captions.seed_edits import edit_name
from loramill.dataset_files import MANIFEST, METADATA, match_key
from loramill.files import read_jsonl


@dataclass(frozen=True)
class ReviewedDataset:
    """One dataset under review: where its edits and the workflow's results are."""

    name: str
    root: Path  # data/<ds>
    results: Path  # results/<ds>
    rules: Rules  # the merge stage's, from the dataset's effective config

    @classmethod
    def from_settings(cls, name: str, settings: dict[str, Any]) -> ReviewedDataset:
        """From a dataset's effective settings (loramill.workflow_config.load_datasets)."""
        rules = Rules.from_config(settings["merge"], settings["trigger_words"])
        return cls(name, Path(settings["path"]), Path("results") / name, rules)

    @property
    def table(self) -> Table:
        return Table(self.root / METADATA)

    def _manifest(self) -> dict[str, Any]:
        manifest = self.results / "resized" / MANIFEST
        auto = self.results / "auto_captions.jsonl"
        if not manifest.is_file() or not auto.is_file():
            raise LoramillError(
                f"{self.name}: no captions yet; run `snakemake --cores 1 "
                f"results/{self.name}/captions.jsonl` first"
            )
        return _unchanged_since_read(manifest, _parse_manifest)

    def resized(self) -> set[str]:
        """The resized images' file names: all the page may show."""
        return {image["file"] for image in self._manifest()["images"]}

    def auto_captions(self) -> list[dict[str, Any]]:
        return _unchanged_since_read(self.results / "auto_captions.jsonl", read_jsonl)

    def images(
        self, manifest: dict[str, Any] | None = None, auto: list[dict[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per resized file name: its manifest record and auto caption record."""
        manifest = manifest or self._manifest()
        by_image = {r["image"]: r for r in (auto or self.auto_captions())}
        return {
            image["file"]: {**image, "auto": by_image.get(image["file"], {})}
            for image in manifest["images"]
        }

    def edits(self, table: Table) -> dict[str, Edit]:
        """Every edit: ``table``'s (metadata.csv as read once) and the sidecars'."""
        return with_sidecars(table.edits, self.root / "captions")

    def caption(self, auto: str, edit: Edit | None) -> str | None:
        """The training caption (None: excluded), by the merge stage's rules."""
        return training_caption(auto, edit, self.rules)

    def state(self) -> dict[str, Any]:
        """Everything the page shows, and the version of metadata.csv it was read from."""
        table, manifest, drafts = self.table, self._manifest(), self.auto_captions()
        edits, images = self.edits(table), self.images(manifest, drafts)
        rows = []
        for file, image in sorted(images.items()):
            auto = image["auto"].get("caption", "")
            edit = edits.get(match_key(file))
            rows.append({
                "image": file,
                "name": edit_name(image.get("source", file), file),
                "bucket": image.get("bucket"),
                "sha256": image["auto"].get("image_sha256", image.get("sha256", "")),
                "auto": auto,
                "edit": None if edit is None else {
                    "prompt": edit.text, "mode": edit.mode, "origin": edit.origin,
                    "sidecar": not edit.origin.startswith(METADATA),
                },
                "training": self.caption(auto, edit),
            })  # fmt: skip
        return {
            "dataset": self.name,
            "version": table.version,
            "trigger": list(self.rules.trigger_words),
            "images": rows,
            "quarantined": manifest.get("quarantined", []),
            "problems": edit_problems(drafts, edits),
            "modes_need_column": "mode" not in table.header,
        }

    def preview(self, image: str, prompt: str, mode: str) -> str | None:
        """The training caption ``image`` would get with this edit."""
        if mode not in MODES:
            raise LoramillError(f"mode: '{mode}': one of {', '.join(MODES)}")
        record = self.images().get(image)
        if record is None:
            raise LoramillError(f"{image}: not an image of {self.name}")
        text = " ".join(prompt.split())
        edit = Edit(text, mode, "", "page") if text or mode == "exclude" else None
        return self.caption(record["auto"].get("caption", ""), edit)

    def changes(self, requested: dict[str, Any], table: Table) -> list[Change]:
        """The page's ``{image: {"prompt", "mode"} | None}`` as changes of ``table``, each
        checked: an image of the dataset, not edited by a sidecar (the page writes metadata.csv
        only). What the merge stage checks, it checks on the table they make."""
        if not isinstance(requested, dict):
            raise LoramillError("changes: an object of image: edit or null")
        images, edits = self.images(), self.edits(table)
        out = []
        for file, wanted in requested.items():
            image = images.get(file)
            if image is None:
                raise LoramillError(f"{file}: not an image of {self.name}")
            edit = edits.get(match_key(file))
            if edit is not None and not edit.origin.startswith(METADATA):
                raise LoramillError(f"{file}: edited in {edit.origin}; change it there")
            name = edit_name(image.get("source", file), file)
            sha = image["auto"].get("image_sha256", "")
            if wanted is None:
                out.append(Change(name, None))
                continue
            if not isinstance(wanted, dict) or not isinstance(wanted.get("prompt"), str):
                raise LoramillError(f"{file}: an edit is {{prompt: text, mode}} or null")
            prompt, mode = " ".join(wanted["prompt"].split()), wanted.get("mode") or "replace"
            out.append(Change(name, prompt, str(mode), sha))
        return out


def _unchanged_since_read(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, read again only when the file changed: the page asks for a thumbnail or
    a preview per image, each checked against the manifest and the auto captions. (Shared:
    callers do not change what they get.)"""
    stat = path.stat()
    return _read_once(path, read, (stat.st_ino, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _read_once(path: Path, read: Callable[[Path], Any], stamp: tuple[int, int, int]) -> Any:
    return read(path)


def _parse_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(image["file"], str) for image in manifest["images"]):
            raise TypeError
    except (ValueError, KeyError, TypeError):  # bad JSON, or not the resize stage's record
        raise LoramillError(f"{path}: not the resize stage's manifest; run it again") from None
    return manifest

"""Review a dataset's captions in the browser: ``python -m loramill.captions.review DATASET``
(``make captions DS=DATASET``) prints a local URL; the page shows every image with its auto
caption, human edit and training caption, and saves edits to ``data/<ds>/metadata.csv``."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import yaml

from loramill import LoramillError
from loramill.captions.review.dataset import ReviewedDataset
from loramill.workflow_config import load_datasets

HOST = "127.0.0.1"  # the loopback only: never reachable from another machine


def reviewed(name: str, config_file: Path) -> ReviewedDataset:
    """The dataset ``name`` of the project's config, checked as the workflow checks it."""
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    if name not in (config.get("datasets") or {}):
        raise LoramillError(f"{name}: not a dataset of {config_file}")
    datasets = load_datasets(config)
    if datasets[name]["task"] != "image":
        raise LoramillError(f"{name}: a {datasets[name]['task']} dataset has no captions")
    dataset = ReviewedDataset.from_settings(name, datasets[name])
    dataset.state()  # what the page will read: a missing stage or a bad edit file, said now
    return dataset


def main(argv: list[str] | None = None) -> int:
    from werkzeug.serving import make_server

    from loramill.captions.review.server import create_app

    parser = argparse.ArgumentParser(
        prog="python -m loramill.captions.review", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", metavar="DATASET", help="an image dataset of the config")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    args = parser.parse_args(argv)
    try:
        dataset = reviewed(args.dataset, args.config)
    except LoramillError as error:
        print(f"loramill: {error}", file=sys.stderr)
        return 1
    token = secrets.token_urlsafe(24)
    server = make_server(HOST, args.port, create_app(dataset, token), threaded=True)
    print(f"caption review of {dataset.name}: http://{HOST}:{server.port}/?token={token}")
    print("edits are saved to", dataset.root / "metadata.csv", "- Ctrl-C stops the server")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

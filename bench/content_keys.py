"""Cost of content-keyed reruns on a no-op dry run (issue #3).

Builds a throw-away copy of the workflow with N generated datasets × M images, trains
everything once with a deliberately cheap config, then times, interleaved and in the same run:

  keyed warm   snakemake -n train_all                       (profile auto-loaded, hash cache kept)
  baseline     snakemake -n train_all --workflow-profile none --rerun-triggers mtime
                 --config content_keyed_reruns=False
               (plain Snakemake: modification times, same rules and DAG, no fingerprints)
  keyed cold   snakemake -n train_all after deleting .cache/hashes.sqlite

and, in-process, loramill.freshness.assess alone with a warm and a cold HashCache. Exits 1 when
the warm ratio exceeds the target (1.3 × baseline).

    .venv/bin/python bench/content_keys.py [--datasets 20] [--images 500] [--repeats 3]
                                           [--workdir DIR]   # reuse DIR if already built
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
COPIED = ("Snakefile", "rules", "scripts", "config", "profiles", "envs", "src", "models")
TARGET = 1.3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
DRY = ["-n", "train_all"]
# Without the profile, Snakemake's default rerun triggers would rerun every resize job here:
# the keyed build recorded its gate file as an input ("set of input files has changed").
PLAIN = [*DRY, "--workflow-profile", "none", "--rerun-triggers", "mtime"]
PLAIN += ["--config", "content_keyed_reruns=False"]


def cheap_config(names: list[str]) -> dict:
    """Every dataset, with training and grid cut down to one step each."""
    return {
        "base_model": "models/tiny-sd",
        "datasets": {ds: {"trigger": ds.replace("_", "")} for ds in names},
        "resize": {"resolution": 64},
        "train": {
            "max_train_steps": 1,
            "save_steps": 1,
            "train_text_encoder": False,
            "threads": 1,
        },
        "grid": {"prompts": ["{trigger}"], "strengths": [1.0], "num_inference_steps": 1},
    }


def prepare(work: Path, n_datasets: int, n_images: int) -> list[str]:
    for name in COPIED:
        source, target = REPO / name, work / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    sys.path.insert(0, str(work / "src"))  # loramill as copied, as the workflow imports it
    from loramill.demo_data import STYLES, generate_dataset

    names = [f"ds{i:02d}" for i in range(n_datasets)]
    for i, ds in enumerate(names):
        if not (work / "data" / ds / "images").is_dir():
            generate_dataset(work / "data" / ds, STYLES[i % len(STYLES)], n_images, seed=i)
    config = cheap_config(names)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return names


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [SNAKEMAKE, *args], cwd=work, env=ENV, capture_output=True, text=True, check=False
    )
    if result.returncode:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def build(work: Path) -> None:
    """Train everything once, echoing Snakemake's progress lines."""
    start = time.perf_counter()
    with open(work / "build.log", "w") as log:
        process = subprocess.Popen(
            [SNAKEMAKE, "--cores", "2", "train_all"],
            cwd=work,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            log.write(line)
            if re.search(r"\d+ of \d+ steps|Nothing to be done", line):
                print(f"  [{time.perf_counter() - start:5.0f} s] {line.strip()}", flush=True)
    if process.wait():
        sys.exit(f"build failed, see {work / 'build.log'}")
    print(f"build: {time.perf_counter() - start:.0f} s")


def nothing_to_do(work: Path, args: list[str]) -> None:
    result = snakemake(work, *args)
    if "Nothing to be done" not in result.stdout + result.stderr:
        sys.exit(f"`snakemake {' '.join(args)}` is not a no-op:\n{result.stdout}{result.stderr}")


def timed(work: Path, args: list[str], cold: bool = False) -> float:
    if cold:
        (work / ".cache" / "hashes.sqlite").unlink(missing_ok=True)
    start = time.perf_counter()
    snakemake(work, *args)
    return time.perf_counter() - start


def assess_alone(work: Path, names: list[str], repeats: int) -> dict[str, float]:
    """Median seconds of loramill.freshness.assess in-process, warm and cold hash cache."""
    os.chdir(work)
    from snakemake.utils import validate

    from loramill.config import dataset_config
    from loramill.freshness import assess
    from loramill.hashing import DEFAULT_DB, HashCache

    schema = str(work / "config" / "config.schema.yaml")
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    validate(config, schema)  # fills in the defaults, as the workflow does
    datasets = {ds: dataset_config(config, ds, lambda c: validate(c, schema)) for ds in names}
    times: dict[str, list[float]] = {"warm": [], "cold": []}
    for _ in range(repeats):
        for kind, db in (("warm", DEFAULT_DB), ("cold", DEFAULT_DB.with_name("cold.sqlite"))):
            start = time.perf_counter()
            hashes = HashCache(db)
            verdicts = assess(datasets, hashes)
            hashes.save()
            times[kind].append(time.perf_counter() - start)
            if kind == "cold":
                db.unlink()
            stale = [v.line() for v in verdicts if not v.fresh]
            if stale:
                sys.exit(f"assess found stale stages: {stale[:3]}")
    return {kind: statistics.median(values) for kind, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="kept afterwards; reused if built")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loramill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    try:
        print(f"workdir {work}: {args.datasets} datasets × {args.images} images", flush=True)
        names = prepare(work, args.datasets, args.images)
        build(work)
        nothing_to_do(work, DRY)
        nothing_to_do(work, PLAIN)
        runs = {"keyed warm": (DRY, False), "baseline": (PLAIN, False), "keyed cold": (DRY, True)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name, (command, cold) in runs.items():
                times[name].append(timed(work, command, cold))
            line = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
            print(f"repeat {repeat + 1}: {line}", flush=True)
        median = {name: statistics.median(values) for name, values in times.items()}
        alone = assess_alone(work, names, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = median["baseline"]
    print(f"\n{args.datasets} datasets × {args.images} images, median of {args.repeats}")
    print(f"{'run':<34}{'seconds':>9}{'× baseline':>12}")
    for name, seconds in median.items():
        print(f"{'snakemake -n train_all, ' + name:<34}{seconds:>9.2f}{seconds / base:>12.2f}")
    for kind, seconds in alone.items():
        print(f"{'assess() alone, ' + kind + ' cache':<34}{seconds:>9.2f}{seconds / base:>12.2f}")
    ratio = median["keyed warm"] / base
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"\nwarm ratio {ratio:.2f} (target ≤ {TARGET}): {verdict}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

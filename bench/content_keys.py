"""Cost of content-keyed reruns at realistic image sizes (issue #8).

Builds a throw-away copy of the workflow with N generated datasets × M distinct JPEGs of about
--image-mb MB each (1600 × 1200 at 1 MB; seeded, so reruns generate the same bytes), trains
everything once with a deliberately cheap config (the resize stage decodes every image), then
measures, in the same run:

  (a) cold hashing   in-process: loramill.dataset_files.folder_hashes(images, "images",
                     HashCache(empty database)) over every dataset; image bytes / wall
                     seconds, and per CPU second (the machine may be shared). Once with the OS
                     page cache as it is (the images were just read), once after
                     `echo 3 > /proc/sys/vm/drop_caches` when that is permitted.
  (b) warm, interleaved, --repeats rounds:
        keyed      snakemake -n train_all              (profile auto-loaded, hash cache kept)
        baseline   snakemake -n train_all --workflow-profile none --rerun-triggers mtime
                     --config content_keyed_reruns=False
                   (plain Snakemake: modification times, same rules and DAG, no fingerprints)
      The warm ratio is the median over rounds of keyed ÷ baseline within a round, so load
      from other work that changes between rounds cancels out.
  (c) keyed cold     snakemake -n train_all after deleting .cache/hashes.sqlite, in each round
                     of (b); implied GB/s = image bytes / (median cold − median keyed warm).
                     Once more after dropping the page cache, when permitted.

Exits 1 when the warm ratio keyed / baseline exceeds the target (1.3).

    .venv/bin/python bench/content_keys.py [--datasets 20] [--images 500] [--repeats 3]
        [--image-mb 1.0] [--workdir DIR]   # DIR is kept, and reused where already built
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
COPIED = ("Snakefile", "rules", "scripts", "config", "profiles", "envs", "src", "models")
TARGET = 1.3
GB = 1e9
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
DRY = ["-n", "train_all"]
# Without the profile, Snakemake's default rerun triggers would rerun every resize job here:
# the keyed build recorded its gate file as an input ("set of input files has changed").
PLAIN = [*DRY, "--workflow-profile", "none", "--rerun-triggers", "mtime"]
PLAIN += ["--config", "content_keyed_reruns=False"]
# At 1 MB: 1600 × 1200 pixels; other sizes scale the area, so the JPEG quality stays similar.
BASE_SIZE = (1600, 1200)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("square", "circle", "triangle")


# ---- datasets ----------------------------------------------------------------------------


def base_picture(seed: int, image_mb: float) -> np.ndarray:
    """A dataset's background: a colour gradient with coarse and fine noise (photo-like
    entropy, so JPEG needs about a megabyte at quality 85–90)."""
    rng = np.random.default_rng(seed)
    scale = image_mb**0.5
    w, h = (max(64, round(side * scale / 8) * 8) for side in BASE_SIZE)
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    pixels = 40 + 140 * x * rng.uniform(0.2, 1, 3) + 70 * y * rng.uniform(0.2, 1, 3)
    pixels = pixels + rng.normal(0, 25, (h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
    pixels = pixels + rng.normal(0, 20, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def marked(base: np.ndarray, label: str, rnd: random.Random) -> tuple[Image.Image, str]:
    """The base with one drawn shape and a label: every picture (and file) differs."""
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    colour, shape = rnd.choice(list(COLOURS)), rnd.choice(SHAPES)
    r = rnd.uniform(0.1, 0.25) * min(w, h)
    x, y = rnd.uniform(r, w - r), rnd.uniform(r, h - r)
    if shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=COLOURS[colour])
    draw.text((8, 8), label, fill=(255, 255, 255))
    return image, f"{colour}_{shape}"


def jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def calibrate(image: Image.Image, target: float) -> int:
    """The JPEG quality (30–95) whose file size comes closest to ``target`` bytes."""
    low, high = 30, 95
    while low < high:
        middle = (low + high) // 2
        if len(jpeg(image, middle)) < target:
            low = middle + 1
        else:
            high = middle
    candidates = {q: abs(len(jpeg(image, q)) - target) for q in (max(30, low - 1), low)}
    return min(candidates, key=candidates.get)


def generate_dataset(folder: Path, seed: int, n_images: int, image_mb: float) -> int:
    """Write ``folder``/images (via a scratch folder, so an interrupted run starts over);
    return its bytes. One quality per dataset, calibrated on its first picture."""
    base = base_picture(seed, image_mb)
    rnd = random.Random(seed)
    scratch = folder / "images.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    quality, total = None, 0
    for index in range(n_images):
        image, words = marked(base, f"{folder.name} {index:05d}", rnd)
        quality = quality or calibrate(image, image_mb * 1e6)
        data = jpeg(image, quality)
        (scratch / f"{words}_{index:05d}.jpg").write_bytes(data)
        total += len(data)
    scratch.rename(folder / "images")
    return total


def image_bytes(work: Path, names: list[str]) -> tuple[int, int]:
    """(total bytes, file count) of every dataset's images."""
    sizes = [f.stat().st_size for ds in names for f in (work / "data" / ds / "images").iterdir()]
    return sum(sizes), len(sizes)


def generate(work: Path, names: list[str], n_images: int, image_mb: float) -> None:
    """Generate the datasets not already there, one process per core."""
    todo = [(i, ds) for i, ds in enumerate(names) if not (work / "data" / ds / "images").is_dir()]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        jobs = [
            pool.submit(generate_dataset, work / "data" / ds, i, n_images, image_mb)
            for i, ds in todo
        ]
        for (_, ds), job in zip(todo, jobs, strict=True):
            size = job.result() / GB
            print(f"  [{time.perf_counter() - start:5.0f} s] {ds}: {size:.2f} GB", flush=True)
    total, count = image_bytes(work, names)
    print(
        f"images: {count} files, {total / GB:.2f} GB ({total / count / 1e6:.2f} MB each); "
        f"generated {len(todo)} datasets in {time.perf_counter() - start:.0f} s",
        flush=True,
    )


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


def prepare(work: Path, args: argparse.Namespace) -> list[str]:
    """Copy the workflow into ``work``, generate the datasets, write the cheap config."""
    for name in COPIED:
        source, target = REPO / name, work / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    names = [f"ds{i:02d}" for i in range(args.datasets)]
    generate(work, names, args.images, args.image_mb)
    config = cheap_config(names)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return names


# ---- Snakemake runs ----------------------------------------------------------------------


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [SNAKEMAKE, *args], cwd=work, env=ENV, capture_output=True, text=True, check=False
    )
    if result.returncode:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def build(work: Path) -> float:
    """Train everything once, echoing Snakemake's progress lines; return the seconds."""
    start = time.perf_counter()
    with open(work / "build.log", "w") as log:
        process = subprocess.Popen(
            [SNAKEMAKE, "--cores", str(os.cpu_count()), "train_all"],
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
    seconds = time.perf_counter() - start
    print(f"build: {seconds:.0f} s, load average {load()}", flush=True)
    return seconds


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


def dry_runs(work: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds of the three dry runs per repeat, interleaved."""
    nothing_to_do(work, DRY)
    nothing_to_do(work, PLAIN)
    runs = {"keyed warm": (DRY, False), "baseline": (PLAIN, False), "keyed cold": (DRY, True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, (command, cold) in runs.items():
            times[name].append(timed(work, command, cold))
        line = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
        print(f"repeat {repeat + 1}: {line}, load average {load()}", flush=True)
    return times


# ---- in-process hashing ------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def drop_caches() -> bool:
    """Empty the OS page cache (root only; a container may refuse)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        print(f"drop_caches not permitted: {error}", flush=True)
        return False
    return True


def hash_cold(work: Path, names: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds, and file count, of folder_hashes over every dataset with an
    empty HashCache."""
    os.chdir(work)
    if str(work / "src") not in sys.path:
        sys.path.insert(0, str(work / "src"))  # loramill as copied, as the workflow imports it
    from loramill.dataset_files import folder_hashes
    from loramill.hashing import HashCache

    db = work / ".cache" / "bench-cold.sqlite"
    db.unlink(missing_ok=True)
    hashes = HashCache(db)  # an empty database, never saved
    wall, cpu = time.perf_counter(), time.process_time()
    count = sum(len(folder_hashes(f"data/{ds}/images", "images", hashes)) for ds in names)
    return time.perf_counter() - wall, time.process_time() - cpu, count


def hashing(work: Path, names: list[str]) -> dict[str, tuple[float, float | None]]:
    """``{what: (wall, CPU seconds)}``: (a) with the page cache as it is, then after dropping
    it where permitted, and then one keyed cold dry run (c) after dropping it again."""
    found: dict[str, tuple[float, float | None]] = {}
    for cache in ("page cache as is", "after drop_caches"):
        if cache == "after drop_caches" and not drop_caches():
            return found
        wall, cpu, count = hash_cold(work, names)
        found[f"(a) folder_hashes in-process, {cache}"] = (wall, cpu)
        print(f"(a) {count} files, {cache}: {wall:.2f} s, load {load()}", flush=True)
    if drop_caches():
        wall = timed(work, DRY, cold=True)
        found["(c) keyed cold dry run, after drop_caches"] = (wall, None)
        print(f"(c) after drop_caches: {wall:.2f} s, load {load()}", flush=True)
    return found


# ---- report ------------------------------------------------------------------------------


def report(args: argparse.Namespace, total: int, cold: dict, times: dict) -> float:
    """Print the figures; return the warm ratio: the median over repeats of keyed warm ÷
    baseline within a repeat (both sides of a repeat see about the same load)."""
    median = {name: statistics.median(values) for name, values in times.items()}
    warm, base = times["keyed warm"], times["baseline"]
    ratio = statistics.median(k / b for k, b in zip(warm, base, strict=True))
    print(
        f"\n{args.datasets} datasets × {args.images} images, {total / GB:.2f} GB, "
        f"median of {args.repeats}, load average {load()}"
    )
    for label, (wall, cpu) in cold.items():
        # a dry run's hashing: its time beyond a warm one
        hashed = wall - median["keyed warm"] if cpu is None else wall
        rate = f"{total / GB / hashed:.2f} GB/s" if hashed > 0 else "n/a"
        per_cpu = f", {total / GB / cpu:.2f} GB per CPU second" if cpu else ""
        print(f"{label + ':':<52}{wall:7.2f} s, {rate}{per_cpu}")
    print(f"{'(b)/(c) snakemake -n train_all':<40}{'seconds':>9}{'× baseline':>12}")
    for name, seconds in median.items():
        print(f"{'  ' + name:<40}{seconds:>9.2f}{seconds / median['baseline']:>12.2f}")
    extra = median["keyed cold"] - median["keyed warm"]
    implied = f"{total / GB / extra:.2f} GB/s" if extra > 0 else "n/a"
    print(f"(c) keyed cold, page cache as is: image bytes / (cold − keyed warm) = {implied}")
    per_repeat = " ".join(f"{k / b:.2f}" for k, b in zip(warm, base, strict=True))
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"\n(b) warm ratio per repeat: {per_repeat}")
    print(f"(b) warm ratio {ratio:.2f}, median of those (target ≤ {TARGET}): {verdict}")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-mb", type=float, default=1.0, help="target JPEG size")
    parser.add_argument("--workdir", type=Path, help="kept afterwards; reused if built")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loramill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    try:
        print(f"workdir {work}: {args.datasets} datasets × {args.images} images, load {load()}")
        names = prepare(work, args)
        total, _ = image_bytes(work, names)
        build(work)
        times = dry_runs(work, args.repeats)
        cold = hashing(work, names)
    finally:
        os.chdir(REPO)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = report(args, total, cold, times)
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

"""loramill against kohya sd-scripts' train_network.py, side by side on this machine (issue #28).

The same work on both sides: the SD1.5 architecture with random weights (bench/build_sd15.py),
256 px squares, batch 1, LoRA rank 4 alpha 4 on kohya's 192 UNet modules (loramill's
`network_target: kohya`), UNet only, latents cached, AdamW at a constant LR, gradient clipping
at 1.0, SDPA attention, 2 threads. kohya runs its text encoder every step (train_network.py
cannot cache its outputs for SD1.x); loramill reads cached embeddings. kohya's text-encoder time
is reported apart, and its step without it.

Each run is a fresh process whose peak RSS is its own (os.wait4). Rounds interleave every side,
so both sides of a ratio see about the same machine; a ratio is kohya's median s/step over
loramill's in one round, and the figure is the median of the rounds' ratios. Precisions: fp32,
bf16 mixed (frozen weights bf16, LoRA fp32 on both sides), and kohya's `--full_bf16` (LoRA
weights and AdamW state in bf16 too) against loramill's bf16.

Nothing is fetched at run time. kohya's checkout and its own Python environment (kohya pins
transformers 4 and diffusers 0.32, so it cannot share loramill's):

    bench/kohya_env.sh /work/kohya          # sd-scripts from a snapshot of kohya-ss/sd-scripts
    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/vs_kohya.py --model /tmp/sd15 --kohya /work/kohya/sd-scripts \
        --kohya-python /work/kohya/venv/bin/python [--rounds 3] [--warm 3] [--timed 20]

--profile [fp32|bf16] instead runs one step of each side under torch.profiler (by operator and by
UNet block: bench/step_profile.py) and prints both reports.

Exits 1 when a target is missed: loramill ≥ 1.2× kohya's speed in fp32 and in bf16 (against
kohya's faster bf16 mode), and a peak RSS no higher than kohya's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from loramill import openmp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package
from train_real_size import (
    ENV,
    fresh,
    prepare_dataset,
    run_child,
    source_fingerprint,
    train_spec,
)

SPEED_TARGET = 1.2  # kohya s/step / loramill s/step, per precision
# Each side with the OpenMP setting its users get: loramill's jobs spin briefly, then sleep,
# unless the user says otherwise (rules/setup.smk); kohya sets nothing: libgomp's default.
LORAMILL_ENV = {**ENV, **openmp.job_environment(ENV)}
KOHYA_ENV = {k: v for k, v in ENV.items() if k not in openmp.VARIABLES}
RUNNER = Path(__file__).resolve().parent / "kohya_runner.py"
TRIGGER = "zzt"
# side -> (who, loramill mixed_precision or kohya flags)
SIDES: dict[str, tuple[str, Any]] = {
    "loramill fp32": ("loramill", "no"),
    "kohya fp32": ("kohya", ["--mixed_precision", "no"]),
    "loramill bf16": ("loramill", "bf16"),
    "kohya bf16": ("kohya", ["--mixed_precision", "bf16"]),
    "kohya full_bf16": ("kohya", ["--mixed_precision", "bf16", "--full_bf16"]),
}
# loramill side: each pair of precision rows (loramill, the kohya sides it is measured against)
PAIRS = {"fp32": ("loramill fp32", ("kohya fp32",)),
         "bf16": ("loramill bf16", ("kohya bf16", "kohya full_bf16"))}  # fmt: skip


def kohya_model(model: Path, work: Path) -> Path:
    """The model as kohya's transformers 4 reads it: the same files, except the text encoder,
    whose keys transformers 5 saved without the `text_model.` prefix that 4 expects."""
    from safetensors.torch import load_file, save_file

    target = work / "kohya-model"
    if (target / "model_index.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        if entry.name != "text_encoder":
            (target / entry.name).symlink_to(entry.resolve())
    (target / "text_encoder").mkdir()
    shutil.copy(model / "text_encoder" / "config.json", target / "text_encoder")
    weights = load_file(model / "text_encoder" / "model.safetensors")
    renamed = {
        k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()
    }
    save_file(renamed, target / "text_encoder" / "model.safetensors")
    return target


def kohya_tokenizer(model: Path, work: Path) -> Path:
    """kohya loads SD1.x's tokenizer by its hub name from --tokenizer_cache_dir
    (library/strategy_sd.py), in the slow format: vocab.json, merges.txt and the length."""
    cache = work / "kohya-tokenizer"
    folder = cache / "openai_clip-vit-large-patch14"
    if (folder / "tokenizer_config.json").exists():
        return cache
    folder.mkdir(parents=True)
    bpe = json.loads((model / "tokenizer" / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return cache


def kohya_dataset(data: Path, work: Path, steps: int) -> Path:
    """The resized images and their captions in kohya's folder layout, `<repeats>_<name>/`
    with a .txt caption beside each image, repeated so that one epoch spans the run."""
    records = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    repeats = -(-steps // len(records))
    root = fresh(work / "kohya-data")
    folder = root / f"{repeats}_{TRIGGER}"
    folder.mkdir(parents=True)
    for record in records:
        image = folder / record["image"]
        shutil.copy(data / "resized" / record["image"], image)
        image.with_suffix(".txt").write_text(record["caption"])
    return root


def kohya_command(args: argparse.Namespace, paths: dict[str, Path], flags: list[str]) -> list:
    steps = args.warm + args.timed
    return [
        str(args.kohya_python), str(RUNNER), str(args.kohya),
        "--pretrained_model_name_or_path", str(paths["model"]),
        "--tokenizer_cache_dir", str(paths["tokenizer"]),
        "--train_data_dir", str(paths["data"]), "--caption_extension", ".txt",
        "--resolution", "256", "--train_batch_size", "1",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
        "--network_train_unet_only", "--cache_latents", "--sdpa",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
        "--max_grad_norm", "1.0", "--max_train_steps", str(steps), "--seed", "42",
        "--max_data_loader_n_workers", "0",
        "--output_dir", str(fresh(args.workdir / "kohya-out")), "--output_name", "kohya",
        *flags,
    ]  # fmt: skip


def loramill_spec(
    args: argparse.Namespace, data: Path, precision: str, steps: int = 0, name: str = ""
) -> dict[str, Any]:
    """A loramill run of the compared settings (a timed run unless ``steps`` says otherwise),
    on the bench's shared latent and text caches."""
    steps = steps or args.warm + args.timed
    run_dir = fresh(args.workdir / f"run-{name or precision}")
    return train_spec(
        str(args.model), data, run_dir, args.workdir / "cache", network_target="kohya",
        max_train_steps=steps, save_steps=steps, mixed_precision=precision,
    )  # fmt: skip


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """The dataset both ways, kohya's model and tokenizer folders, and loramill's caches
    filled by one short run, so that no timed run encodes anything."""
    work = args.workdir
    data = prepare_dataset(work, args.images, 256)
    paths = {
        "model": kohya_model(args.model, work),
        "tokenizer": kohya_tokenizer(args.model, work),
        "data": kohya_dataset(data, work, args.warm + args.timed),
    }
    prime = loramill_spec(args, data, "no", steps=1, name="prime")
    run_child(prime, work, "prime-cache", env=LORAMILL_ENV)
    return data, paths


def measure(args: argparse.Namespace) -> dict[str, dict[str, list]]:
    work = args.workdir
    data, paths = prepare(args)
    found: dict[str, dict[str, list]] = {
        s: {"round_s": [], "peak_mib": [], "te_s": []} for s in SIDES
    }
    for repeat in range(1, args.rounds + 1):
        for side, (who, setting) in SIDES.items():
            label = f"r{repeat}-{side.replace(' ', '-')}"
            if who == "loramill":
                spec = loramill_spec(args, data, setting)
                child = run_child(spec, work, label, env=LORAMILL_ENV)
                if not child.line("latents: ").startswith("0 encoded"):
                    sys.exit(f"{label} encoded latents: the cache was not warm")
            else:
                command = kohya_command(args, paths, setting)
                child = run_child({}, work, label, command=command, cwd=args.kohya, env=KOHYA_ENV)
                if any("were not initialized" in line for line in child.lines):
                    sys.exit(f"{label}: kohya initialised weights the model should have had")
            timed = child.result["steps"][args.warm :]
            if len(timed) != args.timed:
                sys.exit(f"{label}: {len(timed)} timed steps, expected {args.timed}")
            found[side]["round_s"].append(statistics.median(timed))
            found[side]["peak_mib"].append(child.peak_mib)
            te = child.result.get("text_encoder", [])[args.warm :]
            found[side]["te_s"].append(statistics.median(te) if te else 0.0)
            print(f"    median {found[side]['round_s'][-1]:.2f} s/step", flush=True)
    return found


def profile(args: argparse.Namespace) -> None:
    """One step of each side at ``args.profile`` precision (fp32 or bf16: kohya's mixed bf16)
    under torch.profiler (bench/step_profile.py): the step after the warm-up, in a run of its
    own; the reports go to the workdir and to stdout."""
    work, step = args.workdir, args.warm + 1
    ours, kohyas = PAIRS[args.profile]
    data, paths = prepare(args)
    spec = loramill_spec(args, data, SIDES[ours][1]) | {
        "profile": {"step": step, "out": str(work / "profile-loramill.txt")}
    }
    run_child(spec, work, "profile-loramill", env=LORAMILL_ENV)
    command = kohya_command(args, paths, SIDES[kohyas[0]][1])
    env = KOHYA_ENV | {"PROFILE_STEP": str(step), "PROFILE_OUT": str(work / "profile-kohya.txt")}
    run_child({}, work, "profile-kohya", command=command, cwd=args.kohya, env=env)
    for side in ("loramill", "kohya"):
        print(f"\n{(work / f'profile-{side}.txt').read_text()}")


def ratio(found: dict, kohya: str, ours: str, less_te: bool = False) -> float:
    """Median over rounds of kohya's s/step over loramill's in the same round."""
    rows = zip(found[kohya]["round_s"], found[kohya]["te_s"], found[ours]["round_s"], strict=True)
    return statistics.median((k - (te if less_te else 0.0)) / o for k, te, o in rows)


def report(found: dict, args: argparse.Namespace) -> bool:
    print(f"\n256 px, batch 1, rank 4, UNet only, cached latents; {args.timed} timed steps after "
          f"{args.warm}, {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'side':<18}{'s/step per round':>28}{'TE s/step':>11}{'peak RSS':>10}")
    for side, m in found.items():
        rounds = " ".join(f"{x:.2f}" for x in m["round_s"])
        te = statistics.median(m["te_s"])
        print(f"{side:<18}{rounds:>28}{te:>11.3f}{max(m['peak_mib']) / 1024:>8.2f}Gi")
    ok = True
    for precision, (ours, kohyas) in PAIRS.items():
        ratios = {k: ratio(found, k, ours) for k in kohyas}
        for kohya, value in ratios.items():
            print(f"{kohya} / {ours}: {value:.2f} (kohya less its text encoder: "
                  f"{ratio(found, kohya, ours, less_te=True):.2f})")  # fmt: skip
        fast = min(ratios.values()) >= SPEED_TARGET
        lean = max(found[ours]["peak_mib"]) <= min(max(found[k]["peak_mib"]) for k in kohyas)
        print(f"{precision}: speed ≥ {SPEED_TARGET}× kohya's {'met' if fast else 'MISSED'}; "
              f"peak RSS ≤ kohya's {'met' if lean else 'MISSED'}")  # fmt: skip
        ok &= fast and lean
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/sd15"))
    parser.add_argument("--kohya", type=Path, required=True, help="an sd-scripts checkout")
    parser.add_argument("--kohya-python", type=Path, required=True, help="its venv's python")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vs-kohya"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--timed", type=int, default=20, help="timed steps per run")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument(
        "--profile", nargs="?", const="fp32", choices=PAIRS, help="profile one step of each"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir, args.kohya = args.workdir.resolve(), args.kohya.resolve()
    source = source_fingerprint()
    print(f"model {args.model}, kohya {args.kohya}, code {source}", flush=True)
    if args.profile:
        profile(args)
        return 0
    found = measure(args)
    (args.workdir / "results.json").write_text(json.dumps({"source": source, "found": found}))
    ok = report(found, args)
    if source_fingerprint() != source:
        print("src/loramill changed during the run: rerun")
        ok = False
    print(f"\n{'all targets met' if ok else 'a target was MISSED'}; figures in "
          f"{args.workdir / 'results.json'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

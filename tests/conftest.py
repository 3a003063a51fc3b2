"""Shared fixtures. Everything runs offline on CPU: tests of mechanics on a random-weight tiny
model built here, tests of what is learned (and the demo) on the embedded pretrained one."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from worker_groups import (  # noqa: F401 (hooks: how make test splits the suite)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_xdist_make_scheduler,
)

# Any accidental hub access must fail fast instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads (libgomp reads it then): the suite and the jobs it starts share the cores
# with other work, where spinning OpenMP threads run 10-100x slower (bench/thread_policy.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
# bitsandbytes (train.quantize_base) beside the environment, not in it (Makefile)
BITSANDBYTES = REPO / ".venv" / "bitsandbytes"
# The embedded model, pretrained to draw coloured shapes (models/pretrain_tiny_sd.py).
EMBEDDED_SD = REPO / "models" / "tiny-sd"


def digest(path: Path) -> str:
    """A file's sha256: tests compare files by it, as pytest's report of two unequal blobs
    diffs them character by character (tens of minutes for one checkpoint)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _build_random_sd() -> Path:
    """SD1.x layout at the smallest widths, random weights, built once per session (~1 s):
    several times faster to train and sample than the embedded model, and enough wherever
    what the model has learned does not matter."""
    from loramill.demo.tiny_models import build_random_sd

    root = Path(tempfile.mkdtemp(prefix="loramill-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_random_sd(root / "tiny-sd")


TINY_SD = _build_random_sd()

SAMPLE_PROVENANCE = {
    "dataset": "sample",
    "trigger": "smplx",
    "data_fingerprint": "0" * 64,
    "base_model": str(TINY_SD),
    "base_model_hash": "1" * 64,
    "train_config": {"rank": 4, "alpha": 2, "learning_rate": 1e-4, "max_train_steps": 1},
    "seed": 7,
    "resolution": 64,
    "num_images": 3,
    "tag_frequency": {"smplx": 3, "red circle": 2},
    "versions": {"loramill": "0.1.0"},
}


@pytest.fixture(autouse=True)
def interpreter_signal_handlers():
    """Each test starts with the handlers a fresh interpreter has: torchrun's launcher, run in
    this process by the distributed tests, sets its own for SIGINT, SIGTERM, SIGHUP and SIGQUIT
    and leaves them (a test of SIGINT on the same xdist worker then failed)."""
    defaults = {signal.SIGINT: signal.default_int_handler}
    defaults |= dict.fromkeys((signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT), signal.SIG_DFL)
    for number, handler in defaults.items():
        signal.signal(number, handler)
    yield
    for number, handler in defaults.items():
        signal.signal(number, handler)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_sd() -> str:
    return str(TINY_SD)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL-architecture pipeline (loramill.demo.tiny_sdxl), built once a session."""
    from loramill.demo.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """The tiny FLUX.1 [dev]-architecture pipeline (loramill.demo.tiny_flux), built once."""
    from loramill.demo.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory) -> Path:
    """The tiny Chroma-architecture pipeline, built once a session."""
    from loramill.demo.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-chroma", chroma=True)


def make_random_checkpoint(path: Path, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> Path:
    """A checkpoint whose LoRA weights are random (non-zero B), so strength visibly matters."""
    import torch

    from loramill.models.base_model import load_pipeline
    from loramill.models.checkpoint import save_checkpoint
    from loramill.models.network import NetworkSpec, add_lora

    pipe = load_pipeline(str(TINY_SD))
    torch.manual_seed(seed)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    add_lora(models, NetworkSpec("attention", rank, alpha), init=False)
    metadata = {"loramill.step": "1", "loramill.provenance": json.dumps(SAMPLE_PROVENANCE)}
    save_checkpoint(path, models, metadata)
    return path


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-000001.safetensors")


BIN = Path(sys.executable).parent


def run_tool(*args: str, cwd: Path, check: bool = True, timeout: int = 900):
    """Run a command of the test environment (snakemake, dvc, ...) and capture its output."""
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def clone_checkout(dest: Path, source: Path = REPO) -> Path:
    """Copy what a `git clone` would bring: tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        path = source / name
        if path.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        git(dest, *command)
    return dest


GIT = ["git", "-c", "user.name=loramill-tests", "-c", "user.email=tests@loramill.invalid"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def edit_config(root: Path, change) -> None:
    path = root / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# The demo made small: a few steps, a few grid cells, tiny images.
SMALL = {
    "device": "cpu",  # the Slurm tests' cluster has no GPU: no job may ask for one
    "resize": {"resolution": 32},
    "train": {"max_train_steps": 2, "save_steps": 1, "train_batch_size": 1},
    "grid": {"prompts": ["{trigger}"], "strengths": [0.0, 1.0], "num_inference_steps": 2},
    "text": {
        "train": {"max_train_steps": 4, "save_steps": 2, "train_batch_size": 4},
        "evaluate": {
            "prompts": ["### Question:\nHow do I clean fan 4?\n\n### Response:\n"],
            "max_new_tokens": 4,
        },
    },
}


def small(config: dict) -> None:
    for section, values in SMALL.items():
        if isinstance(values, dict):
            config[section].update(values)
        else:
            config[section] = values
    for entry in config["datasets"].values():
        # SMALL's steps and one prompt, not the demo's per-dataset ones
        for section in ("train", "grid"):
            (entry or {}).pop(section, None)
    # but one grid that sets no prompts, as a new dataset's: it shows its training captions
    config["datasets"]["paper_stripes"]["grid"] = {"prompts": []}


@dataclass(frozen=True)
class SmallBuild:
    before: Path  # the checkout as it was before the build: configured, pulled, not built
    built: Path  # the same built (`snakemake --cores 2 train_all`), published and committed
    result: subprocess.CompletedProcess  # what the build printed


def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session that every xdist worker sees (each worker's own base
    temp is a subfolder of it); without xdist, the session's base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def small_build(tmp_path_factory) -> SmallBuild:
    """One real build of the small demo, shared by the rerun scenarios, the Slurm tests and the
    resume test: a committed, published repository whose datasets are all built, with its own
    DVC remote. Built once per session, by whichever worker asks first (the other waits on the
    lock); every user copies it before changing anything."""
    shared = session_folder(tmp_path_factory) / "small-build"
    shared.mkdir(exist_ok=True)
    with FileLock(shared / ".lock"):
        record = shared / "build.json"
        if not record.exists():
            result = _build_small(shared)
            fields = ("args", "returncode", "stdout", "stderr")
            record.write_text(json.dumps({key: getattr(result, key) for key in fields}))
    return SmallBuild(
        shared / "before",
        shared / "built",
        subprocess.CompletedProcess(**json.loads(record.read_text())),
    )


def _build_small(shared: Path) -> subprocess.CompletedProcess:
    root = clone_checkout(shared / "built")
    run_tool("dvc", "pull", cwd=root)
    edit_config(root, small)
    run_tool("dvc", "remote", "add", "-d", "team", str(shared / "remote"), cwd=root)
    run_tool("dvc", "push", cwd=root)
    shutil.copytree(root, shared / "before", symlinks=True)
    # Two jobs at a time: parallel jobs share the hash database, the run-cache and the locks,
    # and every scenario of test_reruns starts from what they left.
    result = run_tool("snakemake", "--cores", "2", "train_all", cwd=root)
    run_tool("python", "-m", "loramill.publish", cwd=root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "built")
    return result


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One real `dvc pull` + `snakemake --cores 1 train_all` on a fresh copy, shared by the
    tests that only read its results."""
    checkout = clone_checkout(tmp_path_factory.mktemp("demo") / "loramill")
    venv = BIN.parent
    # The README's demo command itself (dvc pull + snakemake), with this test environment's
    # venv standing in for the one `make` would create (-o: don't reinstall it).
    result = subprocess.run(
        ["make", "-o", f"{venv}/.installed", "demo", f"VENV={venv}"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, f"make demo failed:\n{result.stdout}\n{result.stderr}"
    return checkout


@pytest.fixture(scope="session")
def demo_report(demo_run) -> Path:
    """The README's report command (`make report`) run once on the demo: report.html."""
    venv = BIN.parent
    result = subprocess.run(
        ["make", "-o", f"{venv}/.installed", "report", f"VENV={venv}"],
        cwd=demo_run, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"make report failed:\n{result.stdout}\n{result.stderr}"
    return demo_run / "report.html"


# ---------------------------------------------------------------- training on a tiny dataset

TRAIN_CONFIG = {
    "rank": 4,
    "alpha": 2,
    "learning_rate": 1e-3,
    "max_train_steps": 6,
    "save_steps": 4,
    "train_batch_size": 2,
    "seed": 3,
    "threads": 1,  # the tiny model trains faster on one (bench/README.md), and workers share cores
}


# Buckets 16×64 … 64×16 around 32²
SMALL_BUCKETS = {"resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64,
                 "bucket_reso_steps": 16}  # fmt: skip


def prepare_set(root: Path, style: str, count: int, seed: int = 0, trigger: str = "") -> dict:
    """Generated pictures in ``root/ds``, resized into ``root/resized`` and captioned into
    ``root/captions.jsonl`` as the stages would; the resize manifest."""
    from loramill.captions.merge import merge_captions
    from loramill.demo.images import generate_dataset
    from loramill.files import write_jsonl
    from loramill.prepare.resize import resize_dataset

    generate_dataset(root / "ds", style, count, seed)
    manifest = resize_dataset(root / "ds" / "images", root / "resized", SMALL_BUCKETS,
                              cache_dir=root / "cache")  # fmt: skip
    auto = [{"image": e["file"], "caption": e["file"][:-4]} for e in manifest["images"]]
    write_jsonl(root / "auto.jsonl", auto)
    merge_captions(root / "auto.jsonl", None, root / "captions.jsonl", root / "r.json", trigger)
    return manifest


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Five captioned stripe images resized into two buckets (read-only: shared by every
    module, and by the session's shared runs)."""
    root = tmp_path_factory.mktemp("train")
    manifest = prepare_set(root, "stripes", 5, trigger="zzt")
    assert len({tuple(e["bucket"]) for e in manifest["images"]}) == 2
    return root


@pytest.fixture(scope="session")
def prepared_reg(tmp_path_factory):
    """Three captioned circle pictures, resized as ``prepared``'s: regularization images."""
    root = tmp_path_factory.mktemp("reg")
    prepare_set(root, "circles", 3)
    return {"reg_resized_dir": root / "resized", "reg_captions_jsonl": root / "captions.jsonl"}


def train(prepared, out, tiny_sd, call=None, **overrides):
    """Train with TRAIN_CONFIG plus ``overrides``; ``call`` holds further train_lora arguments."""
    from loramill.train.loop import train_lora

    return train_lora(
        prepared / "resized",
        prepared / "captions.jsonl",
        out / "checkpoints",
        out / "tb",
        tiny_sd,
        {**TRAIN_CONFIG, **overrides},
        trigger="zzt",
        **(call or {}),
    )


def train_logged(prepared, out, tiny_sd, caplog, config=None, **kwargs):
    """Train and return the loramill log lines it wrote."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loramill"):
        written = train(prepared, out, tiny_sd, call=kwargs, **(config or {}))
    return written, [r.getMessage() for r in caplog.records]


def crash_and_resume(prepared, tmp_path, tiny_sd, caplog, monkeypatch, config):
    """Train ``config`` with a state folder, killed in its fifth step; then run it again.
    Returns what the resumed run wrote and logged."""
    from loramill.train.step import Training

    step, calls = Training.step, []

    def crash_at_step_5(self):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return step(self)

    monkeypatch.setattr(Training, "step", crash_at_step_5)
    state = tmp_path / "state"
    with pytest.raises(RuntimeError, match="killed"):
        train_logged(
            prepared, tmp_path / "crashed", tiny_sd, caplog, config=config, state_dir=state
        )
    monkeypatch.setattr(Training, "step", step)
    return train_logged(
        prepared, tmp_path / "resumed", tiny_sd, caplog, config=config, state_dir=state
    )


# ---------------------------------------------------------------- runs shared by many tests


def train_recorded(prepared, out, tiny_sd, config=None, **kwargs):
    """train_logged for fixtures wider than one test, where caplog is not available."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("loramill")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        written = train(prepared, out, tiny_sd, call=kwargs, **(config or {}))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return written, lines


@pytest.fixture(scope="session")
def plain_run(prepared, tiny_sd, tmp_path_factory):
    """TRAIN_CONFIG trained once per session, on a latent cache of its own (so its log shows
    every encoding): the run that tests of other settings compare against, each training
    costing seconds. Read only; ``folder`` holds checkpoints/, tb/ and cache/."""
    from types import SimpleNamespace

    folder = tmp_path_factory.mktemp("plain")
    written, lines = train_recorded(prepared, folder, tiny_sd, cache_root=folder / "cache")
    return SimpleNamespace(written=written, lines=lines, folder=folder)


# ---------------------------------------------------------------- exports and Flux layouts


def render(pipe):
    """A 64 px image of the pipeline (two steps, seed 0), as a tensor: exports compared."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = pipe("a photo of smplx", height=64, width=64, num_inference_steps=2,
                  generator=generator, output_type="np").images  # fmt: skip
    return torch.from_numpy(images)


def assert_kohya_and_diffusers_agree(pipe, base) -> None:
    """With the two export files loaded as adapters ``kohya`` and ``diffusers``: strength 0 is
    the base image ``base``, strength 1 changes it, and both files draw the same image."""
    import torch

    pipe.set_adapters("kohya", adapter_weights=0.0)
    assert torch.equal(render(pipe), base)
    pipe.set_adapters("kohya", adapter_weights=1.0)
    with_kohya = render(pipe)
    assert (with_kohya - base).abs().max() > 1e-3
    pipe.set_adapters("diffusers", adapter_weights=1.0)
    torch.testing.assert_close(render(pipe), with_kohya, rtol=1e-5, atol=1e-5)


def linears(model) -> dict:
    """A model's Linear layers by name."""
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_lora_pairs(model, names, rank: int, seed: int = 0) -> dict:
    """Random LoRA factors {"A": (rank, in), "B": (out, rank)} for the Linears ``names``."""
    import torch

    rng, found = torch.Generator().manual_seed(seed), linears(model)
    return {
        name: {"A": torch.randn(rank, found[name].in_features, generator=rng),
               "B": torch.randn(found[name].out_features, rank, generator=rng)}
        for name in names
    }  # fmt: skip


@pytest.fixture
def bitsandbytes(monkeypatch):
    """bitsandbytes importable in this test: make test installs it beside .venv, where the
    other tests' processes do not import it (peft imports it whenever it can)."""
    if not BITSANDBYTES.is_dir():
        pytest.fail(f"no {BITSANDBYTES}: run make .venv/.bitsandbytes")
    monkeypatch.syspath_prepend(str(BITSANDBYTES))


@pytest.fixture(scope="module")
def sd15_clients():
    """The clients' rules for SD1.5's architecture (meta device: names and shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loramill.demo.full_size import SD15
    from loramill.demo.tiny_models import CLIP_TEXT
    from loramill.export.verify import Clients

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **SD15["text_encoder"]))
    return Clients({"unet": unet, "text_encoder": text_encoder})

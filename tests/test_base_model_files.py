"""The base model fingerprint covers exactly what load_pipeline reads.

What diffusers and transformers open is observed with Linux inotify (IN_OPEN events on every
folder of the model), which also sees files opened from Rust (safetensors, tokenizers), where
patching Python's open would miss them.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
from conftest import TINY_SD

from loramill import LoramillError, hashing
from loramill.content_params import BY_CONTENT
from loramill.hashing import HashCache
from loramill.model_files import (
    base_model_fingerprint,
    download_patterns,
    fetch_base_model,
    hub_commit,
    loaded_files,
)
from loramill.models.base_model import load_pipeline
from loramill.models.families import image_family

TINY_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
# What a real checkout or hub snapshot carries besides the pipeline's files.
NOISE = [
    ".git/HEAD",
    ".git/objects/ab/cdef",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "text_encoder/model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "README.md",
    "sample.png",
]
SHA = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "loramill/tiny-sd"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def copy_model(tmp_path: Path) -> Path:
    return Path(shutil.copytree(TINY_SD, tmp_path / "tiny-sd"))


def add_noise(folder: Path) -> None:
    weights = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for name in NOISE:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(weights)


def add_optional_components(folder: Path) -> None:
    """An SD1.5-like layout: feature extractor, a safety checker, slow-tokenizer files."""
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "feature_extractor").mkdir()
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}}
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(processor))
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "config.json").write_text("{}")
    (folder / "safety_checker" / "model.safetensors").write_bytes(b"never read")
    bpe = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())["model"]
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "tokenizer" / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]))
    (folder / "tokenizer" / "special_tokens_map.json").write_text(
        '{"bos_token": "<|startoftext|>"}'
    )


def opened_while_loading(folder: Path, allow_unsafe_weights: bool = False) -> set[str]:
    """Files under ``folder`` opened by load_pipeline, as inotify reports them."""
    if not sys.platform.startswith("linux"):
        pytest.skip("file-open instrumentation uses Linux inotify")
    libc = ctypes.CDLL(None, use_errno=True)
    in_open, in_isdir, in_nonblock = 0x20, 0x40000000, 0o4000
    fd = libc.inotify_init1(in_nonblock)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        watches = {}
        for path, _, _ in os.walk(folder):
            watches[libc.inotify_add_watch(fd, os.fsencode(path), in_open)] = Path(path)
        load_pipeline(str(folder), allow_unsafe_weights=allow_unsafe_weights)
        opened = set()
        while True:
            try:
                events = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(events):
                watch, mask, _, size = struct.unpack_from("iIII", events, offset)
                name = events[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                offset += 16 + size
                if name and not mask & in_isdir:
                    opened.add((watches[watch] / name).relative_to(folder).as_posix())
        return opened
    finally:
        os.close(fd)


def assert_loader_reads(folder: Path, allow_unsafe_weights: bool = False) -> list[str]:
    listed = loaded_files(folder, allow_unsafe_weights)
    opened = opened_while_loading(folder, allow_unsafe_weights)
    assert "model_index.json" in opened  # the instrumentation sees opens at all
    assert opened <= set(listed), f"opened but not fingerprinted: {opened - set(listed)}"
    weights = {name for name in listed if name.endswith(WEIGHT_SUFFIXES)}
    assert weights <= opened, f"fingerprinted weights never opened: {weights - opened}"
    return listed


def test_loaded_files_of_the_tiny_model():
    assert loaded_files(TINY_SD) == TINY_FILES


def test_loaded_files_are_what_diffusers_opens(tmp_path):
    folder = copy_model(tmp_path)
    add_noise(folder)
    add_optional_components(folder)
    listed = assert_loader_reads(folder)
    assert not set(listed) & set(NOISE)
    assert not [name for name in listed if name.startswith("safety_checker/")]
    assert "feature_extractor/preprocessor_config.json" in listed


def test_sharded_weights_are_listed_with_their_index(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = copy_model(tmp_path)
    for component, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(folder / component)
        shutil.rmtree(folder / component)
        model.save_pretrained(folder / component, max_shard_size="600KB")
    listed = assert_loader_reads(folder)
    for index in ("unet/diffusion_pytorch_model", "text_encoder/model"):
        assert f"{index}.safetensors.index.json" in listed
        shards = [name for name in listed if name.startswith(f"{index}-0000")]
        assert len(shards) >= 2, listed


def test_pickle_weights_only_with_allow_unsafe_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = copy_model(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert "unet/diffusion_pytorch_model.bin" not in loaded_files(folder)
    listed = assert_loader_reads(folder, allow_unsafe_weights=True)
    assert "unet/diffusion_pytorch_model.bin" in listed
    # With both formats present, the loader prefers safetensors even when pickle is allowed.
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    assert "vae/diffusion_pytorch_model.bin" not in loaded_files(folder, True)


def test_fingerprint_ignores_files_the_loader_skips(tmp_path):
    folder = copy_model(tmp_path)
    before = base_model_fingerprint(str(folder), HashCache())
    # A folder of only what the loader reads: the folder's hash, which caches were keyed by.
    assert before == HashCache().digest(folder)
    add_noise(folder)
    assert base_model_fingerprint(str(folder), HashCache()) == before


@pytest.mark.parametrize(
    "name", ["unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json"]
)
def test_fingerprint_changes_with_a_loaded_file(tmp_path, name):
    folder = copy_model(tmp_path)
    before = base_model_fingerprint(str(folder), HashCache())
    data = bytearray((folder / name).read_bytes())
    data[-2] ^= 1  # inside the tensor data or the JSON, keeping both well-formed
    (folder / name).write_bytes(bytes(data))
    assert base_model_fingerprint(str(folder), HashCache()) != before


def test_warm_fingerprint_hashes_nothing(tmp_path, monkeypatch):
    folder = copy_model(tmp_path)
    db = tmp_path / "hashes.sqlite"
    first = base_model_fingerprint(str(folder), HashCache(db))
    hashed = []
    monkeypatch.setattr(hashing, "hash_file", lambda path: hashed.append(path) or "x")
    assert base_model_fingerprint(str(folder), HashCache(db)) == first
    assert hashed == []


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding loramill/tiny-sd at commit SHA, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--loramill--tiny-sd"
    shutil.copytree(TINY_SD, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    # The env var for child processes; the constant is what huggingface_hub reads per call.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder may shadow the hub id
    return repo


def test_hub_id_fingerprint_is_the_cached_commit(hub_cache):
    assert hub_commit(HUB_ID) == SHA
    first = base_model_fingerprint(HUB_ID, HashCache())
    assert first == f"hub:{HUB_ID}@{SHA}"
    assert base_model_fingerprint(HUB_ID, HashCache()) == first


def test_the_real_loader_uses_the_simulated_cache(hub_cache):
    pipe = load_pipeline(HUB_ID)
    assert pipe.unet is not None
    shutil.rmtree(hub_cache / "snapshots" / SHA)
    with pytest.raises(LoramillError, match="base_model 'loramill/tiny-sd'"):
        load_pipeline(HUB_ID)
    assert hub_commit(HUB_ID) is None


def test_a_cached_hub_model_of_another_family_is_refused_at_parse_time_and_by_its_job(
    hub_cache,
):
    fetch = BY_CONTENT["base_model"].fetch  # what every job with the param runs first
    assert image_family(HUB_ID) == "sd1"
    fetch(HUB_ID, False)  # SD1.x: the job's check says nothing
    snapshot = hub_cache / "snapshots" / SHA
    index = json.loads((snapshot / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (snapshot / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((snapshot / "unet" / "config.json").read_text())
    (snapshot / "unet" / "config.json").write_text(json.dumps({**unet, "in_channels": 9}))
    line = f"base_model '{HUB_ID}': an inpainting model (StableDiffusionInpaintPipeline"
    for check in (lambda: image_family(HUB_ID), lambda: fetch(HUB_ID, False)):
        with pytest.raises(LoramillError) as raised:
            check()
        assert str(raised.value).startswith(line)


def test_hub_id_not_downloaded(hub_cache):
    assert hub_commit("loramill/other") is None
    assert (
        base_model_fingerprint("loramill/other", HashCache()) == "hub:loramill/other@not-downloaded"
    )
    (hub_cache / "refs" / "main").write_text("not a commit")
    assert base_model_fingerprint(HUB_ID, HashCache()) == f"hub:{HUB_ID}@not-downloaded"


def test_fetch_skips_cached_and_local_models(hub_cache, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded a model that is already here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    fetch_base_model(HUB_ID)
    fetch_base_model(str(TINY_SD))


@pytest.mark.parametrize("allow_unsafe_weights", [False, True])
def test_fetch_downloads_what_the_loader_reads(
    hub_cache, monkeypatch, tmp_path, allow_unsafe_weights
):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)))
    fetch_base_model("loramill/other", allow_unsafe_weights)
    [(args, kwargs)] = calls
    assert args == ("loramill/other",)
    assert kwargs["allow_patterns"] == download_patterns(allow_unsafe_weights)
    # Apply the patterns as huggingface_hub does to a full repo listing.
    folder = copy_model(tmp_path)
    add_noise(folder)
    add_optional_components(folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    repo_files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    kept = set(filter_repo_objects(repo_files, **kwargs))
    assert set(loaded_files(folder, allow_unsafe_weights)) <= kept
    assert not kept & (set(NOISE) - {"vae/diffusion_pytorch_model.bin"})
    assert not [name for name in kept if name.startswith("safety_checker/")]
    assert ("unet/diffusion_pytorch_model.bin" in kept) == allow_unsafe_weights


def test_fetch_offline_names_base_model(hub_cache):
    with pytest.raises(LoramillError, match=r"base_model 'loramill/other': cannot load"):
        fetch_base_model("loramill/other")

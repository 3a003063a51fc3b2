"""X/Y/Z comparison grid: real tiny pipeline, real LoRA checkpoints exported as kohya files
(what the grid reads), no mocks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import digest, make_random_checkpoint
from PIL import Image

from loramill import LoramillError
from loramill.grid.build import render_grid

PROMPTS = ["a photo of a cat", "smplx, a red circle on a white background"]
STRENGTHS = [0.0, 1.0]
SETTINGS = {
    "x": "checkpoint", "y": "strength", "z": "prompt", "checkpoints": "all",
    "prompts": PROMPTS, "strengths": STRENGTHS, "negative_prompt": "", "seed": 1234,
    "num_inference_steps": 2, "guidance_scale": 5.0, "sampler": "default", "resolution": 64,
    "dtype": "float32", "batch_size": "auto", "max_megapixels": 64,
}  # fmt: skip


def draw(base, files, out: Path, cache: Path, stem: str = "g", **changes):
    """render_grid with the test settings; outputs ``out/<stem>.png|json`` and pages."""
    return render_grid(
        base, files, {**SETTINGS, **changes}, out / f"{stem}.png", out / f"{stem}.json",
        out / f"{stem}-pages", name=stem, cache_dir=cache, device="cpu",
    )  # fmt: skip


def _with_step(source: Path, target: Path, step: int) -> Path:
    """Copy a checkpoint, giving it its own ``loramill.step``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(target), metadata={**metadata, "loramill.step": str(step)})
    return target


def _exported(checkpoint: Path) -> Path:
    """The export stage's kohya file of a checkpoint, beside it in ``g-steps/``."""
    from loramill.export.job import step_export_name
    from loramill.export.write import export_adapter

    target = checkpoint.parent / "g-steps" / step_export_name("g", checkpoint)
    export_adapter(checkpoint, target, None, "g")
    return target


@pytest.fixture(scope="module")
def reference(tiny_sd):
    """Renders a single cell independently of the grid code (one pipeline, loaded once)."""
    import torch

    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(tiny_sd)

    def render(prompt: str, lora: Path | None = None) -> Image.Image:
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        generator = torch.Generator(device="cpu").manual_seed(SETTINGS["seed"])
        size = SETTINGS["resolution"]
        image = pipe(
            prompt,
            num_inference_steps=SETTINGS["num_inference_steps"],
            guidance_scale=SETTINGS["guidance_scale"],
            height=size,
            width=size,
            generator=generator,
        ).images[0]
        if lora is not None:
            pipe.unload_lora_weights()
        return image

    return render


@pytest.fixture(scope="module")
def grid(tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    # Given out of step order, and with the higher step from the lower seed, so a sorting or
    # column-mapping mistake shows up.
    ckpt40 = _with_step(
        make_random_checkpoint(tmp / "raw-a.safetensors", seed=1),
        tmp / "step-000040.safetensors",
        40,
    )
    ckpt20 = _with_step(
        make_random_checkpoint(tmp / "raw-b.safetensors", seed=2),
        tmp / "step-000020.safetensors",
        20,
    )
    kohya20, kohya40 = _exported(ckpt20), _exported(ckpt40)
    out, cache = tmp / "out", tmp / "cache"
    first = draw(tiny_sd, [kohya40, kohya20], out, cache, "a")
    # The same grid again, adapters given in another order, from an empty cache
    draw(tiny_sd, [kohya20, kohya40], out, tmp / "cache-b", "b")
    description = json.loads((out / "a.json").read_text())
    image = np.asarray(Image.open(out / "a.png").convert("RGB"))
    return {
        "out": out,
        "cache": cache,
        "stats": first,
        "json": description,
        "image": image,
        "ckpts": {20: ckpt20, 40: ckpt40},  # the training checkpoints
        "adapters": {20: kohya20, 40: kohya40},  # their exports, which the grid reads
        "scale": 256 // SETTINGS["resolution"],  # 64 px cells shown at 256 px
    }


def _cell(grid, prompt: str, step: int, strength: float) -> np.ndarray:
    (cell,) = [
        c
        for c in grid["json"]["cells"]
        if (c["prompt"], c["step"], c["unet_strength"]) == (prompt, step, strength)
    ]
    x0, y0, x1, y1 = cell["box"]
    return grid["image"][y0:y1, x0:x1]


def _upscaled(image: Image.Image, scale: int) -> np.ndarray:
    size = (image.width * scale, image.height * scale)
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.NEAREST))


def test_axes_and_cells_are_described(grid):
    d = grid["json"]
    assert d["axes"]["x"]["values"] == [20, 40]
    assert d["axes"]["x"]["labels"] == ["Step: 20", "Step: 40"]
    assert d["axes"]["y"]["values"] == [[0.0, 0.0], [1.0, 1.0]]
    assert d["axes"]["z"]["values"] == PROMPTS
    assert [(c["step"], c["file"]) for c in d["checkpoints"]] == [
        (20, "g-000020.safetensors"),
        (40, "g-000040.safetensors"),
    ]
    assert len({c["adapter_hash"] for c in d["checkpoints"]}) == 2
    assert Path(d["base_model"]).name == "tiny-sd" and len(d["base_model_hash"]) == 64
    assert len(d["cells"]) == len(PROMPTS) * len(STRENGTHS) * 2
    for cell in d["cells"]:
        assert (cell["seed"], cell["num_inference_steps"], cell["guidance_scale"]) == (1234, 2, 5)
    texts = {label["text"] for label in d["pages"][0]["labels"]}
    assert {"Step: 20", "Step: 40", "Strength: 0", "Strength: 1"} <= texts
    assert {f"Prompt: {p}" for p in PROMPTS} <= texts
    # the base-model row is drawn once per prompt, not once per checkpoint
    assert (grid["stats"].rendered, grid["stats"].reused) == (6, 2)


def test_png_size_follows_layout(grid):
    d, image = grid["json"], grid["image"]
    cell = SETTINGS["resolution"] * grid["scale"]
    assert image.shape[:2] == (d["pages"][0]["height"], d["pages"][0]["width"])
    boxes = {(c["prompt"], c["unet_strength"], c["step"]): c["box"] for c in d["cells"]}
    left = boxes[(PROMPTS[0], 0.0, 20)][0]
    assert left > 0  # room for the row labels
    tops = []
    for prompt in PROMPTS:
        top = boxes[(prompt, 0.0, 20)][1]
        tops.append(top)
        for row, strength in enumerate(STRENGTHS):
            for column, step in enumerate([20, 40]):
                x0, y0 = left + column * cell, top + row * cell
                assert boxes[(prompt, strength, step)] == [x0, y0, x0 + cell, y0 + cell]
    # Sub-grids stack vertically, each below the previous one plus its own title and header.
    assert tops[1] > tops[0] + len(STRENGTHS) * cell > 0
    assert image.shape[1] == left + 2 * cell == max(b[2] for b in boxes.values())
    assert image.shape[0] == tops[1] + len(STRENGTHS) * cell == max(b[3] for b in boxes.values())


def test_strength_zero_is_exactly_the_base_model(grid, reference):
    for prompt in PROMPTS:
        base = _upscaled(reference(prompt), grid["scale"])
        for step in (20, 40):
            assert np.array_equal(_cell(grid, prompt, step, 0.0), base), (prompt, step)


def test_strength_one_shows_each_checkpoint(grid, reference):
    for prompt in PROMPTS:
        base = _cell(grid, prompt, 20, 0.0)
        lora20, lora40 = _cell(grid, prompt, 20, 1.0), _cell(grid, prompt, 40, 1.0)
        assert not np.array_equal(lora20, base)
        assert not np.array_equal(lora40, base)
        assert not np.array_equal(lora20, lora40)
    # Each column holds its own checkpoint: compare with an independent render of the training
    # checkpoint itself, so the export the grid reads changes no pixel.
    for step, path in grid["ckpts"].items():
        expected = _upscaled(reference(PROMPTS[0], lora=path), grid["scale"])
        assert np.array_equal(_cell(grid, PROMPTS[0], step, 1.0), expected), step


def test_labels_are_drawn_outside_the_cells(grid):
    d, image = grid["json"], grid["image"]
    cells = [c["box"] for c in d["cells"]]
    for label in d["pages"][0]["labels"]:
        x0, y0, x1, y1 = label["box"]
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0], label
        for cx0, cy0, cx1, cy1 in cells:
            assert x1 <= cx0 or x0 >= cx1 or y1 <= cy0 or y0 >= cy1, label
        assert image[y0:y1, x0:x1].min() < 100, label  # dark ink, not just background
    # Independently of the label boxes: every row's left margin and every sub-grid's header
    # strip carries ink.
    left = min(box[0] for box in cells)
    for x0, y0, _x1, y1 in cells:
        if x0 == left:
            assert image[y0:y1, :left].min() < 100
    for prompt in PROMPTS:
        top = min(c["box"][1] for c in d["cells"] if c["prompt"] == prompt)
        assert image[top - 32 : top, left:].min() < 100


def test_settings_and_hashes_are_in_the_png(grid):
    with Image.open(grid["out"] / "a.png") as image:
        text = dict(image.text)
    assert text["parameters"].startswith(f"{PROMPTS[0]}\nNegative prompt: \nSteps: 2, ")
    assert (
        "Script: X/Y/Z plot, X Type: checkpoint, X Values: Step: 20, Step: 40"
        in (text["parameters"])
    )
    chunk = json.loads(text["loramill.grid"])
    assert chunk["base_model_hash"] == grid["json"]["base_model_hash"]
    assert chunk["checkpoints"] == grid["json"]["checkpoints"]
    assert chunk["render"]["dtype"] == "float32" and "diffusers" in chunk["render"]["software"]


def test_rendering_is_byte_identical(grid):
    out = grid["out"]
    assert digest(out / "a.png") == digest(out / "b.png")
    a, b = (json.loads((out / f"{n}.json").read_text()) for n in "ab")
    assert a == b
    assert [p.name for p in (out / "a-pages").iterdir()] == ["page-1.png"]
    assert digest(out / "a-pages" / "page-1.png") == digest(out / "a.png")


def test_one_more_strength_renders_only_the_new_cells(grid, tiny_sd, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loramill.grid.build")
    stats = draw(tiny_sd, list(grid["adapters"].values()), tmp_path, grid["cache"], "more",
                 strengths=[0.0, 0.5, 1.0])  # fmt: skip
    assert (stats.rendered, stats.reused) == (2 * len(PROMPTS), 8)
    assert "grid more: 4 rendered, 8 reused" in caplog.messages
    more = json.loads((tmp_path / "more.json").read_text())
    image = np.asarray(Image.open(tmp_path / "more.png").convert("RGB"))
    for cell in more["cells"]:
        if cell["unet_strength"] != 0.5:  # the reused cells show the same pixels
            x0, y0, x1, y1 = cell["box"]
            old = _cell(grid, cell["prompt"], cell["step"], cell["unet_strength"])
            assert np.array_equal(image[y0:y1, x0:x1], old)


def test_a_grid_the_cache_holds_loads_no_model(grid, tiny_sd, tmp_path, monkeypatch):
    import loramill.models.base_model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loramill.models.base_model, "load_pipeline", refuse)
    stats = draw(tiny_sd, list(grid["adapters"].values()), tmp_path, grid["cache"], "again")
    assert (stats.rendered, stats.reused) == (0, 8)
    assert digest(tmp_path / "again.png") == digest(grid["out"] / "a.png")
    # a damaged cache entry is drawn again, not trusted
    # (a cell this grid shows: the cache also holds other tests' cells)
    key = grid["json"]["cells"][0]["key"]
    (grid["cache"] / key[:2] / f"{key}.png").write_bytes(b"not a png")
    monkeypatch.undo()
    assert draw(tiny_sd, list(grid["adapters"].values()), tmp_path, grid["cache"]).rendered == 1


def test_a_grid_over_the_cap_is_paged(grid, tiny_sd, tmp_path):
    whole = grid["json"]["pages"][0]
    cap = whole["width"] * whole["height"] * 0.4 / 1e6
    stats = draw(tiny_sd, list(grid["adapters"].values()), tmp_path, grid["cache"], "paged",
                 max_megapixels=cap)  # fmt: skip
    d = json.loads((tmp_path / "paged.json").read_text())
    files = sorted((tmp_path / "paged-pages").iterdir(), key=lambda f: int(f.stem.split("-")[-1]))
    assert digest(files[0]) == digest(tmp_path / "paged.png")
    assert stats.pages == len(d["pages"]) == len(files) > 1
    assert [p["file"] for p in d["pages"]] == [f.name for f in files]
    for page, path in zip(d["pages"], files, strict=True):
        with Image.open(path) as image:
            assert image.size == (page["width"], page["height"])
            assert image.width * image.height <= cap * 1e6
    # every cell once, on some page, with the pixels of the one-page grid
    keys = sorted(c["key"] for c in d["cells"])
    assert keys == sorted(c["key"] for c in grid["json"]["cells"])
    pages = {
        p["page"]: np.asarray(Image.open(f).convert("RGB"))
        for p, f in zip(d["pages"], files, strict=True)
    }
    for cell in d["cells"]:
        x0, y0, x1, y1 = cell["box"]
        shown = pages[cell["page"]][y0:y1, x0:x1]
        assert np.array_equal(
            shown, _cell(grid, cell["prompt"], cell["step"], cell["unet_strength"])
        )


def test_batched_cells_match_single_ones_within_rounding(grid, tiny_sd, tmp_path):
    draw(tiny_sd, [grid["adapters"][20]], tmp_path, tmp_path / "cache", "batched", batch_size=4,
         x="seed", seed=[1234, 5], checkpoints=[20])  # fmt: skip
    d = json.loads((tmp_path / "batched.json").read_text())
    image = np.asarray(Image.open(tmp_path / "batched.png").convert("RGB")).astype(int)
    for cell in d["cells"]:
        if cell["seed"] == 1234:
            x0, y0, x1, y1 = cell["box"]
            single = _cell(grid, cell["prompt"], 20, cell["unet_strength"]).astype(int)
            assert np.abs(image[y0:y1, x0:x1] - single).max() <= 2


def test_a_bad_setting_fails_before_the_model_loads(grid, tiny_sd, tmp_path):
    with pytest.raises(LoramillError, match=r"grid\.prompt_sr: 'dog'"):
        draw(tiny_sd, [grid["adapters"][20]], tmp_path, tmp_path / "c", z="prompt_sr",
             prompts=PROMPTS[:1], prompt_sr=["dog", "cow"])  # fmt: skip
    with pytest.raises(LoramillError, match=r"grid\.checkpoints: no checkpoint at step 30"):
        draw(tiny_sd, [grid["adapters"][20]], tmp_path, tmp_path / "c", checkpoints=[20, 30])
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "c").exists()


def test_unreadable_checkpoint_is_named(grid, tiny_sd, tmp_path):
    corrupt = tmp_path / "step-000099.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file")
    with pytest.raises(LoramillError, match=r"step-000099\.safetensors: cannot read"):
        draw(tiny_sd, [grid["adapters"][20], corrupt], tmp_path, tmp_path / "c")
    assert not (tmp_path / "g.png").exists()


def test_checkpoint_without_step_is_named(grid, tiny_sd, tmp_path):
    from safetensors.torch import load_file, save_file

    stepless = tmp_path / "final.safetensors"
    save_file(load_file(str(grid["adapters"][20])), str(stepless))
    with pytest.raises(LoramillError, match=r"final\.safetensors: no integer 'loramill\.step'"):
        draw(tiny_sd, [stepless], tmp_path, tmp_path / "c")


def test_partial_load_is_refused(grid, tiny_sd, tmp_path):
    # diffusers drops LoRA modules that match no module of the base model without a word.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(grid["adapters"][20]), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key in [k for k in tensors if k.startswith("lora_unet_down_blocks_0_")]:
        tensors[key.replace("down_blocks_0_", "down_blocks_7_")] = tensors[key].clone()
    misfit = tmp_path / "g-000030.safetensors"
    save_file(tensors, str(misfit), metadata={**metadata, "loramill.step": "30"})
    with pytest.raises(LoramillError, match=r"g-000030\.safetensors: \d+ of \d+ unet LoRA"):
        draw(tiny_sd, [misfit], tmp_path, tmp_path / "c", checkpoints=[30])
    assert not (tmp_path / "g.png").exists()


def test_the_cell_cache_follows_the_adapter_tensors_not_the_file(grid):
    """A fp32 export holds the checkpoint's kohya tensors exactly, so cached cells keep their
    keys; the file's metadata (its date) is not part of them."""
    from loramill.export.write import to_kohya
    from loramill.grid.render import adapter_hash, read_adapter
    from loramill.models.checkpoint import read_checkpoint

    for step, path in grid["adapters"].items():
        in_memory = to_kohya(read_checkpoint(grid["ckpts"][step]))
        assert adapter_hash(read_adapter(path)) == adapter_hash(in_memory)


def test_the_grid_encodes_prompts_as_training_did(grid, tiny_sd, tmp_path):
    ckpt, cache = grid["adapters"][20], tmp_path / "c"
    one = {"strengths": [0.0], "prompts": PROMPTS[:1]}
    render = {
        "s": {},
        "k": {"clip_skip": 2},
        "l": {"max_token_length": 150},  # a longer (padded) sequence
    }
    for stem, how in render.items():
        render_grid(tiny_sd, [ckpt], {**SETTINGS, **one}, tmp_path / f"{stem}.png",
                    tmp_path / f"{stem}.json", cache_dir=cache, device="cpu",
                    prompt_reading=how)  # fmt: skip
    same = np.asarray(Image.open(tmp_path / "s.png"))
    for other in ("k.png", "l.png"):
        changed = np.asarray(Image.open(tmp_path / other))
        assert same.shape == changed.shape and np.abs(same.astype(int) - changed).max() > 0


def test_sampler_and_resolution_axes_render_what_they_name(grid, tiny_sd, reference, tmp_path):
    one = {"strengths": [0.0], "prompts": PROMPTS[:1], "checkpoints": [20]}
    draw(tiny_sd, [grid["adapters"][20]], tmp_path, tmp_path / "c", "s", x="sampler", z="none",
         sampler=["default", "ddim", "EulerDiscreteScheduler"], **one)  # fmt: skip
    d = json.loads((tmp_path / "s.json").read_text())
    image = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    shown = {c["sampler"]: image[c["box"][1] : c["box"][3], c["box"][0] : c["box"][2]]
             for c in d["cells"]}  # fmt: skip
    assert np.array_equal(shown["default"], _upscaled(reference(PROMPTS[0]), grid["scale"]))
    assert not np.array_equal(shown["ddim"], shown["default"])
    assert not np.array_equal(shown["EulerDiscreteScheduler"], shown["default"])

    draw(tiny_sd, [grid["adapters"][20]], tmp_path, tmp_path / "c", "r", x="resolution", z="none",
         resolution=[32, 64], **one)  # fmt: skip
    d = json.loads((tmp_path / "r.json").read_text())
    image = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    small, large = sorted(d["cells"], key=lambda c: c["resolution"])
    # one cell size for the grid (the largest resolution's); the 32 px image sits centred in it
    (x0, y0, x1, y1), scale = small["box"], 256 // 64
    assert x1 - x0 == y1 - y0 == 64 * scale == large["box"][2] - large["box"][0]
    margin = (64 - 32) * scale // 2
    inner = image[y0 + margin : y1 - margin, x0 + margin : x1 - margin]
    assert inner.shape[:2] == (32 * scale, 32 * scale) and inner.std() > 0
    assert (image[y0 : y0 + margin, x0:x1] == 255).all()  # background above it


def test_cell_keys_follow_the_files_the_loader_reads(tiny_sd, tmp_path):
    """The base model is named as the stages name it: files beside the ones the loader reads
    (a README, ``.git/``) redraw nothing; a changed weight file redraws every cell."""
    import shutil

    from loramill.grid.build import render_context
    from loramill.grid.plan import plan_grid
    from loramill.hashing import HashCache

    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    cells = plan_grid(SETTINGS, [20, 40]).all_cells()

    def keys() -> list[str]:
        context = render_context(str(model), SETTINGS, device="cpu", hashes=HashCache())
        return [context.cell_key(cell, "adapter") for cell in cells]

    before = keys()
    (model / "README.md").write_text("# a model card\n")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant")
    assert keys() == before
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 1  # inside the tensor data: still a valid file
    weights.write_bytes(bytes(data))
    changed = keys()
    assert all(new != old for new, old in zip(changed, before, strict=True))

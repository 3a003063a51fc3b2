"""X/Y/Z comparison grid: real tiny pipeline, real LoRA checkpoints, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_random_checkpoint
from PIL import Image

from loramill import LoramillError
from loramill.grid import render_grid

PROMPTS = ["a photo of a cat", "smplx, a red circle on a white background"]
STRENGTHS = [0.0, 1.0]
SETTINGS = {"seed": 1234, "num_inference_steps": 2, "guidance_scale": 5.0, "resolution": 64}


def _with_step(source: Path, target: Path, step: int) -> Path:
    """Copy a checkpoint, giving it its own ``loramill.step``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(target), metadata={**metadata, "loramill.step": str(step)})
    return target


@pytest.fixture(scope="module")
def reference(tiny_sd):
    """Renders a single cell independently of the grid code (one pipeline, loaded once)."""
    import torch

    from loramill.model import load_pipeline

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
    out = tmp / "out"
    render_grid(
        tiny_sd, [ckpt40, ckpt20], STRENGTHS, PROMPTS, out / "a.png", out / "a.json", **SETTINGS
    )
    render_grid(
        tiny_sd, [ckpt20, ckpt40], STRENGTHS, PROMPTS, out / "b.png", out / "b.json", **SETTINGS
    )
    description = json.loads((out / "a.json").read_text())
    image = np.asarray(Image.open(out / "a.png").convert("RGB"))
    return {
        "out": out,
        "json": description,
        "image": image,
        "ckpts": {20: ckpt20, 40: ckpt40},
        "scale": description["layout"]["scale"],
    }


def _cell(grid, prompt: str, step: int, strength: float) -> np.ndarray:
    (cell,) = [
        c
        for c in grid["json"]["cells"]
        if (c["prompt"], c["step"], c["strength"]) == (prompt, step, strength)
    ]
    x0, y0, x1, y1 = cell["box"]
    return grid["image"][y0:y1, x0:x1]


def _upscaled(image: Image.Image, scale: int) -> np.ndarray:
    size = (image.width * scale, image.height * scale)
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.NEAREST))


def test_axes_and_cells_are_described(grid):
    d = grid["json"]
    assert d["axes"]["x"] == {"name": "step", "values": [20, 40]}
    assert d["axes"]["y"] == {"name": "strength", "values": STRENGTHS}
    assert d["axes"]["z"] == {"name": "prompt", "values": PROMPTS}
    assert d["checkpoints"] == [
        {"file": "step-000020.safetensors", "step": 20},
        {"file": "step-000040.safetensors", "step": 40},
    ]
    assert (d["seed"], d["num_inference_steps"], d["guidance_scale"]) == (1234, 2, 5.0)
    assert Path(d["base_model"]).name == "tiny-sd"
    assert len(d["cells"]) == len(PROMPTS) * len(STRENGTHS) * 2
    for cell in d["cells"]:
        assert cell["checkpoint"] == f"step-{cell['step']:06d}.safetensors"
    texts = {label["text"] for label in d["labels"]}
    assert {"Step: 20", "Step: 40", "Strength: 0", "Strength: 1"} <= texts
    assert {f"Prompt: {p}" for p in PROMPTS} <= texts


def test_png_size_follows_layout(grid):
    d, image = grid["json"], grid["image"]
    cell = d["layout"]["cell_size"]
    assert cell == SETTINGS["resolution"] * grid["scale"] and cell >= 256
    assert image.shape[:2] == (d["layout"]["height"], d["layout"]["width"])
    boxes = {(c["prompt"], c["strength"], c["step"]): c["box"] for c in d["cells"]}
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
    # Each column holds its own checkpoint: compare with an independent render of the file.
    for step, path in grid["ckpts"].items():
        expected = _upscaled(reference(PROMPTS[0], lora=path), grid["scale"])
        assert np.array_equal(_cell(grid, PROMPTS[0], step, 1.0), expected), step


def test_labels_are_drawn_outside_the_cells(grid):
    d, image = grid["json"], grid["image"]
    cells = [c["box"] for c in d["cells"]]
    for label in d["labels"]:
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
        assert image[top - d["layout"]["cell_size"] // 8 : top, left:].min() < 100


def test_rendering_is_byte_identical(grid):
    out = grid["out"]
    assert (out / "a.png").read_bytes() == (out / "b.png").read_bytes()
    assert (out / "a.json").read_bytes() == (out / "b.json").read_bytes()


@pytest.mark.parametrize(
    ("checkpoints", "strengths", "prompts", "message"),
    [
        ([], STRENGTHS, PROMPTS, "no checkpoints"),
        (None, [], PROMPTS, "no LoRA strengths"),
        (None, STRENGTHS, [], "no prompts"),
    ],
)
def test_empty_axis_is_refused(grid, tiny_sd, tmp_path, checkpoints, strengths, prompts, message):
    checkpoints = list(grid["ckpts"].values()) if checkpoints is None else checkpoints
    with pytest.raises(LoramillError, match=message):
        render_grid(
            tiny_sd,
            checkpoints,
            strengths,
            prompts,
            tmp_path / "g.png",
            tmp_path / "g.json",
            **SETTINGS,
        )
    assert not (tmp_path / "g.png").exists()


def test_unreadable_checkpoint_is_named(grid, tiny_sd, tmp_path):
    corrupt = tmp_path / "step-000099.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file")
    with pytest.raises(LoramillError, match=r"step-000099\.safetensors: cannot read"):
        render_grid(
            tiny_sd,
            [grid["ckpts"][20], corrupt],
            STRENGTHS,
            PROMPTS,
            tmp_path / "g.png",
            tmp_path / "g.json",
            **SETTINGS,
        )
    assert not (tmp_path / "g.png").exists()


def test_checkpoint_without_step_is_named(grid, tiny_sd, tmp_path):
    from safetensors.torch import load_file, save_file

    stepless = tmp_path / "final.safetensors"
    save_file(load_file(str(grid["ckpts"][20])), str(stepless))
    with pytest.raises(LoramillError, match=r"final\.safetensors: no integer 'loramill\.step'"):
        render_grid(
            tiny_sd,
            [stepless],
            STRENGTHS,
            PROMPTS,
            tmp_path / "g.png",
            tmp_path / "g.json",
            **SETTINGS,
        )


def test_partial_load_is_refused(grid, tiny_sd, tmp_path):
    # diffusers drops LoRA tensors that match no module of the base model without a word.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(grid["ckpts"][20]), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key in [k for k in tensors if k.startswith("unet.down_blocks.0.")]:
        tensors[key.replace("down_blocks.0.", "down_blocks.7.")] = tensors[key].clone()
    misfit = tmp_path / "step-000030.safetensors"
    save_file(tensors, str(misfit), metadata=metadata)
    with pytest.raises(LoramillError, match=r"step-000030\.safetensors: \d+ of \d+ unet LoRA"):
        render_grid(
            tiny_sd,
            [misfit],
            STRENGTHS,
            PROMPTS,
            tmp_path / "g.png",
            tmp_path / "g.json",
            **SETTINGS,
        )
    assert not (tmp_path / "g.png").exists()


def test_the_grid_encodes_prompts_as_training_did(grid, tiny_sd, tmp_path):
    ckpt = grid["ckpts"][20]
    render_grid(
        tiny_sd, [ckpt], [0.0], PROMPTS[:1], tmp_path / "s.png", tmp_path / "s.json", **SETTINGS
    )
    render_grid(
        tiny_sd, [ckpt], [0.0], PROMPTS[:1], tmp_path / "k.png", tmp_path / "k.json",
        clip_skip=2, **SETTINGS,
    )  # fmt: skip
    render_grid(
        tiny_sd, [ckpt], [0.0], PROMPTS[:1], tmp_path / "l.png", tmp_path / "l.json",
        max_token_length=150, **SETTINGS,
    )  # fmt: skip
    same = np.asarray(Image.open(tmp_path / "s.png"))
    for other in ("k.png", "l.png"):  # another layer; a longer (padded) sequence
        changed = np.asarray(Image.open(tmp_path / other))
        assert same.shape == changed.shape and np.abs(same.astype(int) - changed).max() > 0

"""The X/Y/Z grid on FLUX.1 [dev] and Chroma (issue #30): the training checkpoints (diffusers
format) drawn by FluxPipeline and ChromaPipeline, prompts read with the train config's T5 length,
strength 0 exactly the base model; settings that mean nothing for Flux refused. Tiny models,
trained once per module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import train_recorded
from PIL import Image

from loramill import LoramillError
from loramill.grid.build import render_grid
from loramill.grid.plan import check_grid

PROMPT = "zzt stripes on a wall"
T5_TOKENS = 16  # the training's t5xxl_max_token_length; the family's default is 512
TRAIN = {"t5xxl_max_token_length": T5_TOKENS, "timestep_sampling": "shift"}
SETTINGS = {
    "x": "checkpoint", "y": "strength", "z": "none", "checkpoints": "all", "prompts": [PROMPT],
    "strengths": [0.0, 1.0], "negative_prompt": "", "seed": 1234, "num_inference_steps": 2,
    "guidance_scale": 3.5, "sampler": "default", "resolution": 32, "dtype": "float32",
    "batch_size": "auto", "max_megapixels": 64,
}  # fmt: skip
SCALE = 256 // SETTINGS["resolution"]  # cells are shown at 256 px
# Six steps at the test's learning rate barely move a 32 px image: the trained lora_B is
# scaled up so that strength 1 shows in 8-bit pixels (the file stays a training checkpoint).
VISIBLE = 50.0


def _visible(checkpoint: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    scaled = {k: t * VISIBLE if ".lora_B." in k else t for k, t in tensors.items()}
    target = checkpoint.parent.parent / "visible" / checkpoint.name
    target.parent.mkdir(exist_ok=True)
    save_file(scaled, str(target), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def trained(prepared, tiny_flux, tiny_chroma, tmp_path_factory):
    """Each family's checkpoints (steps 4 and 6): FLUX.1 [dev] with CLIP-L trained too."""
    runs = {}
    for family, base, extra in (
        ("flux", tiny_flux, {"train_text_encoder": True}),
        ("chroma", tiny_chroma, {}),
    ):
        folder = tmp_path_factory.mktemp(family)
        written, _ = train_recorded(
            prepared, folder, str(base), {**TRAIN, **extra}, cache_root=folder / "cache"
        )
        runs[family] = (str(base), [_visible(path) for path in written])
    return runs


def draw(base: str, adapters: list[Path], out: Path, stem: str = "g", **changes):
    settings = {**SETTINGS, **changes}
    stats = render_grid(
        base, adapters, settings, out / f"{stem}.png", out / f"{stem}.json", out / f"{stem}-p",
        name=stem, prompt_reading={"t5xxl_max_token_length": T5_TOKENS}, device="cpu",
        cache_dir=out / "cache",
    )  # fmt: skip
    image = np.asarray(Image.open(out / f"{stem}.png").convert("RGB"))
    return stats, json.loads((out / f"{stem}.json").read_text()), image


def cell(description: dict, image: np.ndarray, step: int, strength: float) -> np.ndarray:
    (found,) = [
        c for c in description["cells"] if (c["step"], c["unet_strength"]) == (step, strength)
    ]
    x0, y0, x1, y1 = found["box"]
    return image[y0:y1, x0:x1]


def plain(base: str, lora: Path | None = None, **call) -> np.ndarray:
    """A render by the family's own pipeline, outside the grid code, shown as the grid shows
    it (NEAREST-enlarged)."""
    import torch

    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(base)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    size = SETTINGS["resolution"]
    image = pipe(
        PROMPT, height=size, width=size, num_inference_steps=SETTINGS["num_inference_steps"],
        generator=torch.Generator(device="cpu").manual_seed(SETTINGS["seed"]), **call,
    ).images[0]  # fmt: skip
    enlarged = image.resize((size * SCALE, size * SCALE), Image.Resampling.NEAREST)
    return np.asarray(enlarged.convert("RGB"))


@pytest.fixture(scope="module")
def flux_grid(trained, tmp_path_factory):
    base, adapters = trained["flux"]
    out = tmp_path_factory.mktemp("flux-grid")
    stats, description, image = draw(base, adapters, out)
    return base, adapters, out, stats, description, image


def test_flux_strength_zero_is_the_base_model_and_one_each_checkpoint(flux_grid):
    base, adapters, _, stats, d, image = flux_grid
    # [dev]: guidance_scale is the distilled guidance embedding's; T5 reads 16 tokens
    how = {"guidance_scale": 3.5, "max_sequence_length": T5_TOKENS}
    assert (stats.rendered, stats.reused) == (3, 1)  # the base cell drawn once
    alone = plain(base, **how)
    for step in (4, 6):
        assert np.array_equal(cell(d, image, step, 0.0), alone), step
    last = cell(d, image, 6, 1.0)
    assert not np.array_equal(last, cell(d, image, 6, 0.0))
    assert not np.array_equal(last, cell(d, image, 4, 1.0))
    # the transformer's and CLIP-L's LoRA, as diffusers loads the checkpoint itself
    assert np.array_equal(last, plain(base, adapters[-1], **how))


def test_flux_grid_is_described_and_labelled(flux_grid):
    _, _, out, _, d, _ = flux_grid
    assert d["axes"]["x"]["labels"] == ["Step: 4", "Step: 6"]
    assert d["axes"]["y"]["labels"] == ["Strength: 0", "Strength: 1"]
    assert [(c["step"], c["file"]) for c in d["checkpoints"]] == [
        (4, "step-000004.safetensors"),
        (6, "step-000006.safetensors"),
    ]
    # the T5 length the adapter was trained with, and none of CLIP's options
    assert d["render"]["t5xxl_max_token_length"] == T5_TOKENS
    assert "clip_skip" not in d["render"] and "max_token_length" not in d["render"]
    assert {"Step: 4", "Step: 6", "Strength: 0", "Strength: 1"} <= {
        label["text"] for label in d["pages"][0]["labels"]
    }
    with Image.open(out / "g.png") as png:
        text = dict(png.text)
    assert text["parameters"].startswith(f"{PROMPT}\nNegative prompt: \nSteps: 2, ")
    assert "Sampler: default, CFG scale: 3.5, Seed: 1234, Size: 32x32" in text["parameters"]
    chunk = json.loads(text["loramill.grid"])
    assert chunk["render"] == d["render"] and chunk["checkpoints"] == d["checkpoints"]


@pytest.mark.parametrize(
    "reading", [{}, {"t5xxl_max_token_length": T5_TOKENS, "apply_t5_attn_mask": True}]
)
def test_the_train_configs_t5_reading_reads_the_prompts(flux_grid, tmp_path, reading):
    """Unset (the family's 512 tokens, T5 attending to its padding), or with T5's mask, the
    prompts read otherwise: other pixels, under other cell keys."""
    base, adapters, _, _, d, image = flux_grid
    render_grid(base, adapters[-1:], {**SETTINGS, "strengths": [0.0]}, tmp_path / "d.png",
                tmp_path / "d.json", cache_dir=tmp_path / "c", device="cpu",
                prompt_reading=reading)  # fmt: skip
    other = json.loads((tmp_path / "d.json").read_text())
    assert other["render"]["t5xxl_max_token_length"] == reading.get("t5xxl_max_token_length")
    assert other["render"]["apply_t5_attn_mask"] == reading.get("apply_t5_attn_mask")
    (only,) = other["cells"]
    x0, y0, x1, y1 = only["box"]
    drawn = np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))[y0:y1, x0:x1]
    assert not np.array_equal(drawn, cell(d, image, 6, 0.0))
    assert only["key"] not in {c["key"] for c in d["cells"]}


def test_chroma_renders_with_real_guidance_against_the_negative_prompt(trained, tmp_path):
    base, adapters = trained["chroma"]
    settings = {"guidance_scale": 5.0, "negative_prompt": "blurry", "checkpoints": "last"}
    stats, d, image = draw(base, adapters, tmp_path, **settings)
    assert (stats.rendered, d["render"]["t5xxl_max_token_length"]) == (2, T5_TOKENS)
    how = {"guidance_scale": 5.0, "negative_prompt": "blurry", "max_sequence_length": T5_TOKENS}
    assert np.array_equal(cell(d, image, 6, 0.0), plain(base, **how))
    assert not np.array_equal(cell(d, image, 6, 1.0), cell(d, image, 6, 0.0))
    assert np.array_equal(cell(d, image, 6, 1.0), plain(base, adapters[-1], **how))


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (
            {"sampler": ["default", "euler_a"], "z": "sampler"},
            r"grid\.sampler 'euler_a': FLUX\.1 and Chroma",
        ),
        ({"negative_prompt": "blurry"}, r"grid\.negative_prompt 'blurry': FLUX\.1 reads no"),
        ({"resolution": 40}, r"grid\.resolution 40: FLUX\.1 and Chroma draw multiples of 16"),
    ],
)
def test_settings_without_meaning_for_flux_are_refused_naming_the_key(
    trained, tmp_path, change, refused
):
    base, adapters = trained["flux"]
    with pytest.raises(LoramillError, match=refused):
        draw(base, adapters, tmp_path, **change)
    assert not (tmp_path / "cache").exists()  # before any model loads
    check_grid({**SETTINGS, **change}, "sdxl")  # the SD families take them
    with pytest.raises(LoramillError, match=refused):
        check_grid({**SETTINGS, **change}, "flux")


@pytest.mark.parametrize(
    ("rename", "refused"),
    [
        # a double block the base model lacks: 14 of its 2 × 14 + 2 × 6 modules
        (
            ("transformer.transformer_blocks.1.", "transformer.transformer_blocks.7."),
            "14 of 40 transformer",
        ),
        # diffusers loads no LoRA into FLUX.1's T5: such tensors would be dropped whole
        (("text_encoder.", "text_encoder_2."), r"12 of 12 text_encoder_2 LoRA modules"),
    ],
)
def test_a_partial_load_is_refused(trained, tmp_path, rename, refused):
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, adapters = trained["flux"]
    with safe_open(str(adapters[-1]), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    old, new = rename
    misfit = tmp_path / "step-000006.safetensors"
    save_file({k.replace(old, new): t for k, t in tensors.items()}, str(misfit), metadata)
    with pytest.raises(LoramillError, match=rf"step-000006\.safetensors: {refused}"):
        draw(base, [misfit], tmp_path, strengths=[1.0])


def test_a_file_in_kohyas_flux_layout_is_refused_in_one_line(trained, tmp_path):
    """diffusers' reader of kohya's (BFL) layout takes FLUX.1's widths only, and that every
    module of such a file lands is not verified: the grid draws the checkpoints instead."""
    from safetensors.torch import save_file

    from loramill.export.flux.kohya import to_bfl_kohya
    from loramill.models.base_model import load_pipeline
    from loramill.models.checkpoint import module_alpha, read_checkpoint

    base, adapters = trained["flux"]
    checkpoint = read_checkpoint(adapters[-1])
    pairs: dict[str, dict] = {}
    for key, tensor in checkpoint.component("transformer").items():
        module, factor = key.rsplit(".lora_", 1)
        pairs.setdefault(module, {})[factor[0]] = tensor
    config = checkpoint.adapter_configs["transformer"]
    alphas = {module: module_alpha(config, module) for module in pairs}
    kohya = to_bfl_kohya(pairs, alphas, dict(load_pipeline(base).transformer.config))
    path = tmp_path / "wide_bands-000006.safetensors"
    save_file(kohya, str(path), metadata={"loramill.step": "6"})
    with pytest.raises(LoramillError, match=r"000006\.safetensors: cannot load as a LoRA"):
        draw(base, [path], tmp_path, strengths=[1.0])

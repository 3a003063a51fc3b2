"""Tiny, deterministic stand-ins for the real models, built offline from configs.

``sd_pipeline`` makes a Stable Diffusion 1.x-architecture pipeline at given layer sizes (same
module names as SD1.5, so LoRA keys and exports are the real ones): ``TINY`` is the embedded
``models/tiny-sd`` (pretrained by ``models/pretrain_tiny_sd.py``), ``RANDOM_TINY`` the
random-weight model tests of mechanics use (``build_random_sd``); full sizes are in
``loramill.demo.full_size``. ``build_tiny_blip`` makes a BLIP captioner for tests.
Both use the real tokenizers' algorithms; the CLIP tokenizer uses the real CLIP BPE
vocabulary shipped in the ``open-clip-torch`` wheel (installed with ``--no-deps``; the package
itself is never imported because it needs torchvision).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import os
from pathlib import Path

import torch

CLIP_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merge count every CLIP tokenizer uses
CLIP_VOCAB_SIZE = 49408


def clip_bpe_path() -> Path:
    path = Path(importlib.metadata.distribution("open-clip-torch").locate_file(CLIP_BPE_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: install open-clip-torch with --no-deps")
    return path


def build_clip_tokenizer(bpe_path: str | os.PathLike | None = None):
    """The real CLIP BPE tokenizer (vocabulary of 49 408), without any download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(bpe_path or clip_bpe_path()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# Token ids and lengths every CLIP text encoder of SD1.x uses.
CLIP_TEXT = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The noise schedule SD 1.x, 2.x and SDXL were trained with, as their schedulers state it.
SD_NOISE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}
# The embedded model (models/tiny-sd, pretrained by models/pretrain_tiny_sd.py): SD1.x module
# names, so LoRA keys and exports are the real ones, at small widths. 64 px images map to 16×16
# latents (three VAE levels, not SD's four): at 8×8 a shape is a few latent pixels and the UNet
# cannot learn to draw it.
TINY = {
    "unet": {
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 64,
    },
}
# Random weights and the smallest widths that keep SD1.5's layout (four VAE levels, attention
# in some blocks only): tests of the workflow's mechanics, where what is learned does not matter.
RANDOM_TINY = {
    "unet": {
        **TINY["unet"],
        "sample_size": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
    },
    "vae": {
        **TINY["vae"],
        "block_out_channels": (16, 16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 8,
    },
    "text_encoder": {
        **TINY["text_encoder"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
    },
}


def sd_pipeline(sizes: dict[str, dict], seed: int = 0):
    """A Stable Diffusion 1.x pipeline with random weights and the given layer sizes, built
    offline: real CLIP tokenizer, the scheduler SD1.5 ships with. The same seed gives the same
    weights."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sizes["unet"])
    vae = AutoencoderKL(**sizes["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **sizes["text_encoder"]))
    scheduler = PNDMScheduler(**SD_NOISE, skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random_sd(
    out_dir: str | os.PathLike, sizes: dict[str, dict] = RANDOM_TINY, seed: int = 0
) -> Path:
    """Build and save an SD1.x pipeline with random weights; the same seed gives byte-identical
    files."""
    pipe = sd_pipeline(sizes, seed)
    # fp16 on disk keeps the model under a few MB; loading upcasts to the configured dtype.
    pipe.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# Caption-like words plus every letter and digit as a word and as a "##" continuation, so the
# WordPiece tokenizer can spell any lowercase word without [UNK], as BERT's vocabulary can.
BLIP_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
BLIP_WORDS = [
    *("a", "an", "the", "of", "in", "on", "with", "and", "is", "photo", "photography"),
    *("picture", "painting", "drawing", "image", "red", "green", "blue", "yellow", "black"),
    *("white", "orange", "purple", "circle", "square", "triangle", "star", "shape", "small"),
    *("large", "background", "center", "person", "dog", "cat"),
]
BLIP_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
BLIP_PUNCTUATION = list(",.-_'!?")


def build_tiny_blip(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny BLIP captioner (model, BERT tokenizer, processor).

    Random weights, so its captions are gibberish built from real vocabulary; the same seed
    gives byte-identical files. Loads with ``from_pretrained(out_dir, local_files_only=True)``.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    tokens = BLIP_SPECIAL_TOKENS + BLIP_WORDS + BLIP_CHARACTERS
    tokens += [f"##{c}" for c in BLIP_CHARACTERS] + BLIP_PUNCTUATION
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    # BLIP starts decoding from a [DEC] token (the real checkpoints add it as bos_token).
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "eos_token_id": vocab["[SEP]"],
            "sep_token_id": vocab["[SEP]"],
            "initializer_range": 0.2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
            "initializer_range": 0.2,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    # Weights far larger than the usual 0.02 (1e-10 for vision): at the usual scale the image
    # barely reaches the logits of a model this small, and every image gets the same caption.
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny CLIP (model, the real BPE tokenizer, processor) for the ``clip``
    captioner. Random weights scaled up so an image's pixels move its scores."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=build_clip_tokenizer(),
    )
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**layer, "num_attention_heads": 4, "vocab_size": CLIP_VOCAB_SIZE},
        vision_config={**layer, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
        initializer_factor=20.0,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


# The tiny tagger's outputs, as selected_tags.csv lists them: (name, category, what drives it).
# Categories as in WD14's file: 9 rating, 0 general, 4 character.
WD14_TAGS = [
    ("general", 9, 0.3),
    ("sensitive", 9, 0.6),
    ("red_theme", 0, "R"),
    ("blue_theme", 0, "B"),
    ("green_hair", 4, "G"),
    ("simple_background", 0, 0.9),
    ("^_^", 0, 0.8),
]


def build_tiny_wd14(out_dir: str | os.PathLike, size: int = 32) -> Path:
    """A WD14-style tagger (``model.onnx`` + ``selected_tags.csv``) whose answers are known:
    a colour tag's probability rises with the mean of its channel (the input is BGR, 0–255,
    as WD14's), the other tags have fixed probabilities. Needs the ``onnx`` package."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    channel = {"B": 0, "G": 1, "R": 2}
    weight, bias = torch.zeros(len(WD14_TAGS), 3), torch.zeros(len(WD14_TAGS))
    for index, (_, _, drive) in enumerate(WD14_TAGS):
        if isinstance(drive, str):  # sigmoid(12 · (mean/255 − 0.5))
            weight[index, channel[drive]], bias[index] = 12 / 255, -6.0
        else:
            bias[index] = math.log(drive / (1 - drive))

    class Tagger(torch.nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(pixels.mean(dim=(1, 2)) @ weight.T + bias)

    example = torch.zeros(1, size, size, 3)
    torch.onnx.export(
        Tagger(), (example,), str(out / "model.onnx"), input_names=["input_1"],
        output_names=["predictions_sigmoid"], dynamic_axes={"input_1": {0: "batch"}},
        dynamo=False,
    )  # fmt: skip
    with open(out / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category, _) in enumerate(WD14_TAGS):
            writer.writerow([index, name, category, 100 - index])
    return out


# A chat template in the shape instruction VLMs ship: the user's turn (image, then text),
# then where the answer starts.
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %} answer :{% endif %}"
)


def build_tiny_vlm(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny LLaVA (CLIP vision tower, Llama language model, a WordPiece
    tokenizer and a chat template) that ``AutoModelForImageTextToText`` loads: the plumbing
    of the ``vlm`` captioner, with random weights."""
    from transformers import (
        BertTokenizer,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokens = [*BLIP_SPECIAL_TOKENS, "<image>", *BLIP_WORDS, *BLIP_CHARACTERS]
    tokens += [f"##{c}" for c in BLIP_CHARACTERS] + BLIP_PUNCTUATION
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(
        vocab=vocab, model_max_length=128, additional_special_tokens=["<image>"]
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        chat_template=VLM_CHAT_TEMPLATE,
        image_token="<image>",
    )
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = LlavaConfig(
        vision_config={
            **layer, "model_type": "clip_vision_model", "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8,
        },
        text_config={
            **layer, "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": len(vocab), "max_position_embeddings": 128,
            "pad_token_id": vocab["[PAD]"], "bos_token_id": vocab["[CLS]"],
            "eos_token_id": vocab["[SEP]"], "initializer_range": 0.3,
        },
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)

"""Caption stage: template captions, backend registry, the JSONL output, and BLIP end to end."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import digest
from PIL import Image

from loramill import LoramillError
from loramill.captions.autocaption import (
    CAPTIONERS,
    CaptionContext,
    TemplateCaptioner,
    caption_dataset,
    make_captioner,
)
from loramill.demo.tiny_models import (
    build_tiny_blip,
    build_tiny_clip,
    build_tiny_vlm,
    build_tiny_wd14,
)
from loramill.files import read_jsonl
from loramill.hashing import hash_file

IMAGES = {  # file -> colour; listed out of order on purpose
    "red_circle-02.png": (200, 30, 30),
    "blue.square 3.png": (30, 30, 200),
    "0007.png": (250, 250, 250),
    "green-star.png": (30, 200, 30),
}


def template_captions(template: str, names: list[str], dataset="my_shapes", trigger="smplx"):
    captioner = make_captioner(
        {"backend": "template", "template": template}, dataset=dataset, trigger=trigger
    )
    image = Image.new("RGB", (4, 4))
    return captioner.caption([(name, image) for name in names])


def make_resized(root: Path, images: dict[str, tuple[int, int, int]] = IMAGES) -> Path:
    resized = root / "resized"
    resized.mkdir()
    entries = []
    for index, (name, colour) in enumerate(images.items()):
        image = Image.new("RGB", (48, 40), colour)
        # A different dot per image, so a captioner that looks at pixels sees distinct images.
        image.putpixel((index * 7, index * 5), (0, 0, 0))
        image.save(resized / name)
        entries.append({"file": name, "source": f"images/{name}", "original_size": [48, 40]})
    manifest = {"images": entries, "quarantined": [{"source": "images/bad.jpg", "reason": "x"}]}
    (resized / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return resized


@pytest.fixture(autouse=True)
def caption_cache_in_tmp(tmp_path, monkeypatch):
    """The per-image caption cache lives under the working directory's .cache/."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    return str(build_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip"))


# --- template --------------------------------------------------------------------------------


def test_template_words_from_file_stem():
    names = ["red_circle-02.png", "blue.square 3.png", "IMG-2024-sunset_v2.png", "0007.png"]
    assert template_captions("{trigger}, {words}", names) == [
        "smplx, red circle",
        "smplx, blue square",
        "smplx, IMG sunset v2",
        "smplx",  # digits-only stem: empty words, no dangling comma
    ]


def test_template_all_placeholders_and_dataset_spaces():
    assert template_captions("{trigger}, a photo of {words}, {dataset}", ["red_circle-02.png"]) == [
        "smplx, a photo of red circle, my shapes"
    ]


def test_template_collapses_empty_parts():
    assert template_captions("{words}, {trigger}, photo", ["0007.png"]) == ["smplx, photo"]
    assert template_captions("{trigger} {words}, {dataset}", ["0007.png"]) == ["smplx, my shapes"]
    assert template_captions("{trigger}, {words}", ["red_circle-02.png"], trigger="") == [
        "red circle"
    ]


@pytest.mark.parametrize("template", ["{trigger}, {subject}", "{words.upper}", "{trigger} {}"])
def test_template_unknown_placeholder(template):
    with pytest.raises(LoramillError, match=r"caption\.template") as error:
        make_captioner({"backend": "template", "template": template})
    field = template.split("{")[-1].rstrip("}")
    assert f"{{{field}}}" in str(error.value)


def test_template_malformed_braces():
    with pytest.raises(LoramillError, match=r"caption\.template '\{words'"):
        make_captioner({"backend": "template", "template": "{words"})


# --- registry --------------------------------------------------------------------------------


def test_unknown_backend_message():
    with pytest.raises(LoramillError) as error:
        make_captioner({"backend": "xyz"})
    assert str(error.value) == (
        "caption.backend 'xyz': unknown captioner; "
        "choose one of: blip, clip, none, template, vlm, wd14"
    )


def test_registry_and_unknown_key():
    assert CAPTIONERS["template"] is TemplateCaptioner
    captioner = make_captioner({})  # template is the default backend, {words} its default
    assert isinstance(captioner, TemplateCaptioner)
    assert captioner.context == CaptionContext()
    assert captioner.caption([("red_circle-02.png", Image.new("RGB", (4, 4)))]) == ["red circle"]
    with pytest.raises(LoramillError, match=r"^caption\.max_new_token: unknown key"):
        make_captioner({"backend": "template", "max_new_token": 5})


@pytest.mark.parametrize("value", [0, -1, "8", True, 2.5])
def test_bad_batch_size(tiny_blip, value):
    with pytest.raises(LoramillError, match=r"^caption\.batch_size "):
        make_captioner({"backend": "blip", "model": tiny_blip, "batch_size": value})


# --- caption_dataset -------------------------------------------------------------------------


def test_caption_dataset_template(tmp_path):
    resized = make_resized(tmp_path)
    out = tmp_path / "captions" / "captions.jsonl"
    config = {"backend": "template", "template": "{trigger}, {words}, {dataset}"}
    caption_dataset(resized, out, config, dataset="my_shapes", trigger="smplx")
    records = read_jsonl(out)
    assert [(r["image"], r["caption"]) for r in records] == [
        ("0007.png", "smplx, my shapes"),
        ("blue.square 3.png", "smplx, blue square, my shapes"),
        ("green-star.png", "smplx, green star, my shapes"),
        ("red_circle-02.png", "smplx, red circle, my shapes"),
    ]
    for record in records:
        assert record["image_sha256"] == hash_file(resized / record["image"])
        assert record["source"] == "template"
    # one line per image, keys in a stable order
    first = out.read_text(encoding="utf-8").splitlines()[0]
    assert list(json.loads(first)) == ["caption", "image", "image_sha256", "source"]
    # Atomic writer: nothing but the output is left in the folder.
    assert sorted(p.name for p in out.parent.iterdir()) == ["captions.jsonl"]


def test_caption_dataset_replaces_existing_output(tmp_path):
    resized = make_resized(tmp_path, {"a_b.png": (1, 2, 3)})
    out = tmp_path / "captions.jsonl"
    out.write_text("stale\n", encoding="utf-8")
    caption_dataset(resized, out, {"template": "{words}"}, dataset="d", trigger="t")
    assert [(r["image"], r["caption"]) for r in read_jsonl(out)] == [("a_b.png", "a b")]


def test_caption_dataset_manifest_errors(tmp_path):
    out = tmp_path / "captions.jsonl"
    with pytest.raises(LoramillError, match=r"manifest\.json: missing"):
        caption_dataset(tmp_path, out, {}, dataset="d", trigger="t")
    resized = make_resized(tmp_path, {"a.png": (1, 2, 3)})
    (resized / "a.png").unlink()
    with pytest.raises(LoramillError, match=r"a\.png: listed in manifest\.json but missing"):
        caption_dataset(resized, out, {}, dataset="d", trigger="t")
    (resized / "manifest.json").write_text('{"images": [{"file": "../x.png"}]}', encoding="utf-8")
    with pytest.raises(LoramillError, match="escapes"):
        caption_dataset(resized, out, {}, dataset="d", trigger="t")
    twice = '{"images": [{"file": "a.png"}, {"file": "a.png"}]}'
    (resized / "manifest.json").write_text(twice, encoding="utf-8")
    with pytest.raises(LoramillError, match=r"image listed twice: a\.png"):
        caption_dataset(resized, out, {}, dataset="d", trigger="t")
    (resized / "manifest.json").write_text('{"images": [], "quarantined": [{}]}', encoding="utf-8")
    with pytest.raises(LoramillError, match=r"no images to caption \(1 quarantined\)"):
        caption_dataset(resized, out, {}, dataset="d", trigger="t")
    assert not out.exists()


# --- blip ------------------------------------------------------------------------------------


def test_tiny_blip_is_deterministic(tmp_path, tiny_blip):
    other = build_tiny_blip(tmp_path / "again")
    for path in sorted(Path(tiny_blip).iterdir()):
        assert digest(other / path.name) == digest(path), path.name


def test_blip_caption_dataset(tmp_path, tiny_blip):
    resized = make_resized(tmp_path)
    config = {"backend": "blip", "model": tiny_blip, "max_new_tokens": 6, "batch_size": 3}
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    caption_dataset(resized, first, config, dataset="my_shapes", trigger="smplx")
    caption_dataset(resized, second, config, dataset="my_shapes", trigger="smplx")
    records = read_jsonl(first)
    assert [r["image"] for r in records] == sorted(IMAGES)
    assert {r["source"] for r in records} == {f"blip:{tiny_blip}"}
    for record in records:
        assert isinstance(record["caption"], str) and record["caption"].strip()
        assert "\n" not in record["caption"]
    # The tiny model's weights are scaled so pixels matter: not every image captions alike.
    assert len({r["caption"] for r in records}) > 1
    assert first.read_bytes() == second.read_bytes()


def test_blip_prompt_is_used_and_stripped(tiny_blip):
    import torch
    from transformers import AutoProcessor, BlipForConditionalGeneration

    images = [(name, Image.new("RGB", (40, 40), colour)) for name, colour in IMAGES.items()]
    pictures = [image for _, image in images]
    prompt = "a photo of"
    captioner = make_captioner(
        {"backend": "blip", "model": tiny_blip, "max_new_tokens": 6, "prompt": prompt}
    )
    captions = captioner.caption(images)

    # Independent oracle: plain transformers, prompt-conditioned, decoded with the prompt.
    processor = AutoProcessor.from_pretrained(tiny_blip, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip, local_files_only=True).eval()
    inputs = processor(images=pictures, text=[prompt] * len(pictures), return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    full = processor.batch_decode(output, skip_special_tokens=True)
    assert all(text.startswith(prompt) for text in full)
    assert captions == [text[len(prompt) :].strip() for text in full]
    assert all(caption and not caption.startswith(prompt) for caption in captions)

    # The tokenizer lowercases, so a differently spelled prompt is the same prompt.
    shouty = make_captioner(
        {"backend": "blip", "model": tiny_blip, "max_new_tokens": 6, "prompt": " A  Photo OF "}
    )
    assert shouty.caption(images) == captions


def test_blip_missing_model(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LoramillError) as error:
        make_captioner({"backend": "blip", "model": str(missing)})
    message = str(error.value)
    assert message.startswith(f"caption.model '{missing}'") and "\n" not in message
    with pytest.raises(LoramillError, match=r"^caption\.model '': name a hub id"):
        make_captioner({"backend": "blip", "model": " "})


def test_blip_unloadable_folder(tmp_path, tiny_blip):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_blip, broken)
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LoramillError) as error:
        make_captioner({"backend": "blip", "model": str(broken)})
    message = str(error.value)
    assert message.startswith(f"caption.model '{broken}': cannot load") and "\n" not in message


def test_blip_pickle_weights_need_opt_in(tmp_path, tiny_blip):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_blip, pickled)
    weights = load_file(pickled / "model.safetensors")
    torch.save(weights, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(LoramillError, match=r"set allow_unsafe_weights: true \(top level"):
        make_captioner({"backend": "blip", "model": str(pickled)})
    config = {"backend": "blip", "model": str(pickled), "max_new_tokens": 6}
    safe = make_captioner({**config, "model": tiny_blip})
    unsafe = make_captioner({**config, "allow_unsafe_weights": True})
    images = [("x.png", Image.new("RGB", (40, 40), (9, 99, 199)))]
    assert unsafe.caption(images) == safe.caption(images)
    # With both present, the opt-in still loads the safetensors file.
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, pickled / "pytorch_model.bin")
    shutil.copy(Path(tiny_blip) / "model.safetensors", pickled / "model.safetensors")
    both = make_captioner({**config, "allow_unsafe_weights": True})
    assert both.caption(images) == safe.caption(images)


# --- per-image cache -------------------------------------------------------------------------


def caption_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("caption ds:")]


def test_cache_captions_only_what_is_new(tmp_path, tiny_blip, caplog):
    resized = make_resized(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_blip, model)
    config = {"backend": "blip", "model": str(model), "max_new_tokens": 6, "batch_size": 2}

    def caption(out="out.jsonl", **changes):
        kwargs = dict(dataset="", trigger="t", name="ds")
        with caplog.at_level(logging.INFO, logger="loramill"):
            caption_dataset(resized, tmp_path / out, {**config, **changes}, **kwargs)
        return read_jsonl(tmp_path / out)

    first = caption()
    assert caption("again.jsonl") == first
    Image.new("RGB", (48, 40), (90, 90, 0)).save(resized / "zz_new.png")
    manifest = json.loads((resized / "manifest.json").read_text())
    manifest["images"].append({"file": "zz_new.png"})
    (resized / "manifest.json").write_text(json.dumps(manifest))
    assert caption()[:4] == first
    caption(batch_size=4)  # batch size changes speed, never captions
    caption(max_new_tokens=3)  # an option that changes captions
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    caption()  # the model folder replaced in place
    assert caption_lines(caplog) == [
        "caption ds: 4 captioned, 0 reused",
        "caption ds: 0 captioned, 4 reused",
        "caption ds: 1 captioned, 4 reused",
        "caption ds: 0 captioned, 5 reused",
        "caption ds: 5 captioned, 0 reused",
        "caption ds: 5 captioned, 0 reused",
    ]


def test_none_backend_leaves_captions_to_edits(tmp_path, caplog):
    resized = make_resized(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loramill"):
        caption_dataset(resized, tmp_path / "o.jsonl", {"backend": "none"}, dataset="", trigger="")
    assert {r["caption"] for r in read_jsonl(tmp_path / "o.jsonl")} == {""}
    assert {r["source"] for r in read_jsonl(tmp_path / "o.jsonl")} == {"none"}
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("names", "warned"),
    [
        (["DSC_0001.png", "DSC_0002.png", "DSC_0003.png", "cat.png"], "3 of 4 auto captions"),
        (["0001.png", "0002.png", "0003.png", "0004.png"], "4 of 4 auto captions are empty"),
        (["cat.png", "dog.png", "fox.png", "owl.png"], None),
    ],
)
def test_a_warning_when_most_captions_say_the_same(tmp_path, caplog, names, warned):
    resized = make_resized(tmp_path, {name: (9, 9, 9) for name in names})
    config = {"backend": "template", "template": "{words}"}
    with caplog.at_level(logging.WARNING, logger="loramill"):
        caption_dataset(resized, tmp_path / "o.jsonl", config, dataset="", trigger="")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.startswith(warned) for w in warnings] == ([True] if warned else [])


# --- clip ------------------------------------------------------------------------------------

VOCABULARY = {"colour": ["red", "green", "blue"], "shape": ["circle", "square"], "only": ["thing"]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip"))


def clip_captions(model, images, **options):
    config = {"backend": "clip", "clip_model": model, "vocabulary": VOCABULARY, **options}
    return make_captioner(config).caption([(f"{i}.png", im) for i, im in enumerate(images)])


@functools.cache
def reference_clip(model):
    """transformers' own processor and model, loaded once for every reference caption."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPProcessor.from_pretrained(model), CLIPModel.from_pretrained(model)


def reference_best(model, image, template):
    """Each category's most probable term, computed straight from transformers."""
    import torch

    processor, clip = reference_clip(model)
    best = []
    for terms in VOCABULARY.values():
        prompts = [template.format(term=t) for t in terms]
        inputs = processor(text=prompts, images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            best.append(terms[int(clip(**inputs).logits_per_image[0].argmax())])
    return ", ".join(best)


COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (250, 250, 250)]


def test_clip_keeps_the_best_term_of_each_category(tiny_clip):
    images = [Image.new("RGB", (40, 40), colour) for colour in COLOURS]
    for template in ("a photo of {term}", "{term}, flat colour"):
        ours = clip_captions(tiny_clip, images, top_k=1, threshold=0.0, clip_template=template)
        assert ours == [reference_best(tiny_clip, image, template) for image in images]
    assert len(set(ours)) > 1  # the pixels move the scores


def test_clip_thresholds_and_order(tiny_clip):
    image = [Image.new("RGB", (40, 40), COLOURS[0])]
    everything = "red, green, blue, circle, square, thing"  # vocabulary order, not score order
    assert clip_captions(tiny_clip, image, top_k=5, threshold=0.0) == [everything]
    # a probability of 1 only where a category has one term
    assert clip_captions(tiny_clip, image, top_k=5, threshold=0.999) == ["thing"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"vocabulary": {"colour": []}}, r"^caption\.vocabulary: expected a mapping"),
        ({"vocabulary": ["red"]}, r"^caption\.vocabulary: expected a mapping"),
        ({"clip_template": "a photo"}, r"^caption\.clip_template 'a photo': needs \{term\}"),
        ({"threshold": "high"}, r"^caption\.threshold 'high': expected a number"),
        ({"clip_model": "/no/such/model"}, r"^caption\.clip_model '/no/such/model': no such"),
    ],
)
def test_clip_option_errors(tiny_clip, options, message):
    with pytest.raises(LoramillError, match=message):
        make_captioner({"backend": "clip", "clip_model": tiny_clip, **options})


def test_clip_default_vocabulary_is_in_the_cache_key(tiny_clip):
    from loramill.captions.clip_vocabulary import DEFAULT_VOCABULARY
    from loramill.captions.taggers import ClipCaptioner

    options = ClipCaptioner.output_options({"clip_model": tiny_clip})
    assert options["vocabulary"] == DEFAULT_VOCABULARY
    assert "batch_size" not in options


def test_a_model_failing_on_one_image_leaves_the_others(tmp_path, caplog, monkeypatch):
    class Fussy(TemplateCaptioner):
        name = "fussy"

        def caption(self, images):
            if any("broken" in name for name, _ in images):
                raise RuntimeError("bad tensor")
            return super().caption(images)

    monkeypatch.setitem(CAPTIONERS, "fussy", Fussy)
    names = ["a_cat.png", "b_broken.png", "c_dog.png", "d_owl.png"]
    resized = make_resized(tmp_path, {name: (9, 9, 9) for name in names})
    out = tmp_path / "o.jsonl"
    with caplog.at_level(logging.INFO, logger="loramill"):
        for _ in range(2):
            caption_dataset(resized, out, {"backend": "fussy"}, dataset="", trigger="", name="ds")
    captions = [r["caption"] for r in read_jsonl(out)]
    assert captions == ["a cat", "", "c dog", "d owl"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warnings
        == ["b_broken.png: fussy failed (RuntimeError: bad tensor); empty auto caption"] * 2
    )
    # the failure is not cached: the next run tries that image again
    assert caption_lines(caplog) == [
        "caption ds: 4 captioned, 0 reused",
        "caption ds: 1 captioned, 3 reused",
    ]


# --- wd14 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_wd14(tmp_path_factory) -> str:
    return str(build_tiny_wd14(tmp_path_factory.mktemp("models") / "tiny-wd14"))


def wd14_captions(model, images, **options):
    config = {"backend": "wd14", "wd14_model": model, **options}
    return make_captioner(config).caption([(f"{i}.png", im) for i, im in enumerate(images)])


def test_wd14_tags_above_their_thresholds(tiny_wd14):
    red = Image.new("RGB", (40, 40), (230, 10, 10))  # the tagger reads BGR: red is channel 2
    teal = Image.new("RGB", (40, 40), (10, 200, 230))
    # character tags first, then general tags by falling probability; underscores become
    # spaces except in emoticons; no rating tag unless asked
    assert wd14_captions(tiny_wd14, [red, teal]) == [
        "red theme, simple background, ^_^",
        "green hair, blue theme, simple background, ^_^",
    ]
    assert wd14_captions(tiny_wd14, [teal], character_threshold=0.99) == [
        "blue theme, simple background, ^_^"  # green hair at 0.97 is below 0.99
    ]
    assert wd14_captions(tiny_wd14, [teal], general_threshold=0.85) == [
        "green hair, blue theme, simple background"  # ^_^ at 0.8 is below 0.85
    ]
    options = {"rating_tags": True, "exclude_tags": ["simple_background", "^_^"]}
    assert wd14_captions(tiny_wd14, [red], **options) == ["red theme, sensitive"]


def test_wd14_pads_to_a_square_on_white(tiny_wd14):
    # a red band 40×10, padded to 40×40 with white: every channel's mean is high, so the
    # green and blue tags come up too (stretched, or padded with black, they would not)
    band = Image.new("RGB", (40, 10), (230, 10, 10))
    assert wd14_captions(tiny_wd14, [band]) == [
        "green hair, red theme, blue theme, simple background, ^_^"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("selected_tags.csv", r"no selected_tags\.csv"),
        ("model.onnx", r"no model\.onnx"),
    ],
)
def test_wd14_missing_files(tmp_path, tiny_wd14, change, message):
    model = tmp_path / "tagger"
    shutil.copytree(tiny_wd14, model)
    (model / change).unlink()
    with pytest.raises(LoramillError, match=rf"^caption\.wd14_model '{model}': {message}"):
        make_captioner({"backend": "wd14", "wd14_model": str(model)})


def test_wd14_model_not_in_the_hub_cache_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LoramillError) as error:
        make_captioner({"backend": "wd14", "wd14_model": "someone/some-tagger"})
    assert "local folder" in str(error.value) and "\n" not in str(error.value)


# --- vlm -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return str(build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm"))


def reference_answer(model, image, text):
    """What transformers generates for ``text`` (already templated) and one image."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    vlm = AutoModelForImageTextToText.from_pretrained(model)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        output = vlm.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)[0].strip()


def vlm_captions(model, images, **options):
    config = {"backend": "vlm", "vlm_model": model, "max_new_tokens": 5, **options}
    return make_captioner(config).caption([(f"{i}.png", im) for i, im in enumerate(images)])


def test_vlm_answers_the_prompt_in_a_chat_turn(tiny_vlm):
    images = [Image.new("RGB", (40, 40), colour) for colour in COLOURS]
    prompt = "describe the picture"
    ours = vlm_captions(tiny_vlm, images, vlm_prompt=prompt, batch_size=4)
    templated = f"<image>{prompt} answer :"  # the tiny model's chat template
    assert ours == [reference_answer(tiny_vlm, image, templated) for image in images]
    assert len(set(ours)) > 1 and all(prompt not in caption for caption in ours)
    assert vlm_captions(tiny_vlm, images, vlm_prompt="a cat ?", batch_size=4) != ours


def test_vlm_without_a_chat_template_sends_the_prompt_as_is(tmp_path, tiny_vlm):
    model = tmp_path / "task-prompt-model"
    shutil.copytree(tiny_vlm, model)
    (model / "chat_template.jinja").unlink()
    image = Image.new("RGB", (40, 40), COLOURS[1])
    ours = vlm_captions(str(model), [image], vlm_prompt="<image>red or blue")
    assert ours == [reference_answer(str(model), image, "<image>red or blue")]


def test_vlm_empty_prompt(tiny_vlm):
    with pytest.raises(LoramillError, match=r"^caption\.vlm_prompt: empty"):
        make_captioner({"backend": "vlm", "vlm_model": tiny_vlm, "vlm_prompt": " "})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"prefix": "photo of "}, ["photo of red circle", "photo of blue square big"]),
        ({"suffix": ", flat"}, ["red circle, flat", "blue square big, flat"]),
        ({"max_length": 11}, ["red circle", "blue square"]),
        ({"max_length": 4}, ["red", "blue"]),
    ],
)
def test_prefix_suffix_and_max_length_apply_to_every_caption(tmp_path, options, expected):
    resized = make_resized(
        tmp_path, {"red_circle.png": (1, 1, 1), "blue_square_big.png": (2, 2, 2)}
    )
    config = {"backend": "template", **options}
    caption_dataset(resized, tmp_path / "o.jsonl", config, dataset="", trigger="")
    by_image = {r["image"]: r["caption"] for r in read_jsonl(tmp_path / "o.jsonl")}
    assert [by_image["red_circle.png"], by_image["blue_square_big.png"]] == expected


def test_generation_settings_and_dtype(tiny_blip):
    image = [("x.png", Image.new("RGB", (40, 40), (9, 99, 199)))]
    base = {"backend": "blip", "model": tiny_blip, "max_new_tokens": 6}
    for options in ({"dtype": "bfloat16"}, {"num_beams": 2, "repetition_penalty": 1.3}):
        (caption,) = make_captioner({**base, **options}).caption(image)
        assert caption.strip()
    with pytest.raises(LoramillError, match=r"^caption\.dtype 'half': choose one of"):
        make_captioner({**base, "dtype": "half"})


def test_a_hub_model_missing_offline_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(LoramillError) as error:
        make_captioner({"backend": "vlm", "vlm_model": "someone/some-vlm"})
    message = str(error.value)
    assert message.startswith("caption.vlm_model 'someone/some-vlm': cannot load (offline")
    assert "local model folder" in message and "\n" not in message

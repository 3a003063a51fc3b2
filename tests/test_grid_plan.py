"""Grid planning and page layout: pure, no model."""

from __future__ import annotations

import pytest

from loramill import LoramillError
from loramill.grid.layout import Labels, Page, grid_font, layout, paginate
from loramill.grid.plan import (
    batches,
    caption_prompts,
    check_grid,
    plan_grid,
    select_checkpoints,
)

BASE = {
    "x": "checkpoint", "y": "strength", "z": "prompt",
    "prompts": ["a cat", "a dog"], "strengths": [0.0, 1.0], "negative_prompt": "",
    "seed": 7, "num_inference_steps": 2, "guidance_scale": 5.0, "sampler": "default",
    "resolution": 64,
}  # fmt: skip


def settings(**changes):
    return {**BASE, **changes}


def test_default_axes_give_checkpoint_columns_strength_rows_prompt_planes():
    plan = plan_grid(settings(), [40, 20, 60])
    assert plan.x.labels == ("Step: 20", "Step: 40", "Step: 60")
    assert plan.y.labels == ("Strength: 0", "Strength: 1")
    assert plan.z.labels == ("Prompt: a cat", "Prompt: a dog")
    cell = plan.cells[1][0][2]  # z=dog, y=strength 0, x=step 60
    assert (cell.prompt, cell.unet_strength, cell.te_strength, cell.step) == ("a dog", 0, 0, 60)
    assert (cell.seed, cell.num_inference_steps, cell.resolution) == (7, 2, 64)
    assert len(plan.all_cells()) == 12


@pytest.mark.parametrize(
    ("selection", "steps"),
    [("all", [10, 20, 30]), ("last", [30]), ("last:2", [20, 30]), ([10, 30], [10, 30])],
)
def test_checkpoint_selection(selection, steps):
    assert select_checkpoints(selection, [30, 10, 20]) == steps


def test_a_missing_step_is_named_with_the_saved_ones():
    with pytest.raises(LoramillError, match=r"no checkpoint at step 25 \(saved: 10, 20\)"):
        select_checkpoints([10, 25], [10, 20])


def test_any_setting_can_be_an_axis_and_the_rest_are_single_values():
    plan = plan_grid(
        settings(x="seed", y="guidance_scale", z="none", seed=[1, 2], guidance_scale=[3.0, 7.5],
                 prompts=["a cat"], strengths=[0.5], checkpoints=[20]),
        [10, 20],
    )  # fmt: skip
    assert plan.x.labels == ("Seed: 1", "Seed: 2")
    assert plan.y.labels == ("CFG scale: 3", "CFG scale: 7.5")
    assert plan.z.name == "" and len(plan.cells) == 1
    assert {(c.seed, c.guidance_scale, c.step, c.unet_strength) for c in plan.all_cells()} == {
        (1, 3.0, 20, 0.5), (2, 3.0, 20, 0.5), (1, 7.5, 20, 0.5), (2, 7.5, 20, 0.5)
    }  # fmt: skip


def test_off_the_axes_the_checkpoint_is_the_final_step():
    for selection in ("all", "last:2", "last", [20]):
        plan = plan_grid(settings(x="seed", seed=[1, 2], checkpoints=selection), [10, 30, 20])
        assert {c.step for c in plan.all_cells()} == {20 if selection == [20] else 30}
    with pytest.raises(LoramillError, match=r"grid\.checkpoints: 2 values but no axis"):
        plan_grid(settings(x="seed", seed=[1, 2], checkpoints=[10, 20]), [10, 30, 20])


def test_labels_keep_every_digit_a_value_has():
    plan = plan_grid(settings(strengths=[1.0, 1.0000001, 0.25]), [10])
    assert plan.y.labels == ("Strength: 1", "Strength: 1.0000001", "Strength: 0.25")


def test_separate_unet_and_text_encoder_strengths():
    plan = plan_grid(settings(strengths=[[1.0, 0.0], 0.5]), [10])
    assert plan.y.labels == ("Strength: UNet 1, TE 0", "Strength: 0.5")
    first, second = (plan.cells[0][y][0] for y in range(2))
    assert (first.unet_strength, first.te_strength) == (1.0, 0.0)
    assert (second.unet_strength, second.te_strength) == (0.5, 0.5)


def test_prompt_sr_replaces_in_prompt_and_negative_prompt():
    plan = plan_grid(
        settings(z="prompt_sr", prompts=["a red cat"], prompt_sr=["red", "blue", "green"],
                 negative_prompt="red fur"),
        [10],
    )  # fmt: skip
    assert plan.z.labels == ("Prompt S/R: red", "Prompt S/R: blue", "Prompt S/R: green")
    got = [(plan.cells[z][0][0].prompt, plan.cells[z][0][0].negative_prompt) for z in range(3)]
    assert got == [
        ("a red cat", "red fur"),
        ("a blue cat", "blue fur"),
        ("a green cat", "green fur"),
    ]


def test_prompt_sr_is_checked_per_cell_and_needs_an_axis():
    # found in one negative prompt of the axis but not in the other cell: refused, as in A1111
    with pytest.raises(LoramillError, match=r"'red' .* prompt 'a dog' or its negative prompt ''"):
        check_grid(settings(z="prompt_sr", y="negative_prompt", prompts=["a dog"], strengths=[1],
                            negative_prompt=["red", ""], prompt_sr=["red", "blue"]))  # fmt: skip
    with pytest.raises(LoramillError, match=r"grid\.prompt_sr: set x, y or z to prompt_sr"):
        check_grid(settings(prompt_sr=["red", "blue"]))


def test_a_grid_without_prompts_takes_the_first_distinct_training_captions():
    captions = ["zzt, a red disc", "zzt, a red disc", "", "zzt, a blue square", "zzt, a dog"]
    assert caption_prompts(captions, settings(prompts=[])) == [
        "zzt, a red disc",
        "zzt, a blue square",
    ]
    # prompt on no axis: one prompt, the first caption
    assert caption_prompts(captions, settings(z="none", prompts=[])) == ["zzt, a red disc"]
    with pytest.raises(LoramillError, match=r"^grid\.prompts: none set and the dataset has no"):
        caption_prompts([""], settings(prompts=[]))
    check_grid(settings(prompts=[]))  # planned with captions standing in
    check_grid(settings(z="none", prompts=[]))
    with pytest.raises(LoramillError, match=r"^grid\.prompt_sr: set grid\.prompts too"):
        check_grid(settings(z="prompt_sr", prompts=[], prompt_sr=["red", "blue"]))


def test_prompt_sr_search_text_absent_is_refused():
    with pytest.raises(LoramillError, match=r"grid\.prompt_sr: 'red' .* not in the prompt 'a dog'"):
        check_grid(settings(z="prompt_sr", prompts=["a dog"], prompt_sr=["red", "blue"]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": [1, 2]}, r"grid\.seed: 2 values but no axis shows them"),
        ({"y": "prompt"}, r"grid\.z: 'prompt' is already another axis"),
        ({"x": "colour"}, r"grid\.x: 'colour' is not one of checkpoint"),
        ({"sampler": "fastest"}, r"grid\.sampler: 'fastest' is not default"),
        ({"resolution": 60}, r"grid\.resolution: 60 is not a positive multiple of 8"),
        ({"strengths": [float("inf")]}, r"grid\.strengths: inf is not finite"),
        ({"checkpoints": "first"}, r"grid\.checkpoints: 'first' is not all, last"),
    ],
)
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(LoramillError, match=message):
        check_grid(settings(**changes))


def test_batches_share_checkpoint_strength_and_sampler_and_put_the_base_first():
    plan = plan_grid(settings(z="seed", seed=[1, 2, 3], prompts=["a cat"]), [10, 20])
    groups = batches(plan.all_cells(), 2)
    assert [len(g) for g in groups] == [2, 1, 2, 1, 2, 1]
    assert all(not c.uses_adapter for c in groups[0] + groups[1])
    for group in groups:
        assert len({c.batch_group() for c in group}) == 1
    assert [g[0].step for g in groups[2:]] == [10, 10, 20, 20]


FONT = grid_font(256)


def test_layout_is_cells_times_cell_size_plus_margins():
    labels = Labels(("Step: 1", "Step: 2", "Step: 3"), ("Strength: 0", "Strength: 1"),
                    ("Prompt: a", "Prompt: b"))  # fmt: skip
    one = layout(256, labels, Page((0,), (0, 1, 2), (0, 1)), FONT)
    two = layout(256, labels, Page((0, 1), (0, 1, 2), (0, 1)), FONT)
    boxes = sorted(one.cells.values())
    assert all((x1 - x0, y1 - y0) == (256, 256) for x0, y0, x1, y1 in boxes)
    left, top = boxes[0][:2]
    assert one.width == left + 3 * 256
    assert one.height == top + 2 * 256
    # a second sub-grid adds its cells and its own title and header, with a gap
    assert two.height == 2 * one.height + FONT.size
    assert len(two.cells) == 12 and len(set(two.cells.values())) == 12


@pytest.mark.parametrize("long_label", [None, 5])
def test_pages_stay_under_the_cap_and_hold_every_cell_once(long_label):
    columns = [f"Step: {i}" for i in range(7)]
    if long_label is not None:  # a later slice's header is taller than the first one's
        columns[long_label] = "Step: " + " ".join(["word"] * 30)
    labels = Labels(tuple(columns), ("Strength: 0", "Strength: 1"), ("Prompt: a", "Prompt: b"))
    full = layout(256, labels, Page((0, 1), tuple(range(7)), (0, 1)), FONT)
    assert paginate(256, labels, FONT, full.width * full.height) == [
        Page((0, 1), tuple(range(7)), (0, 1))
    ]
    cap = 3 * 256 * 700  # about three columns of one sub-grid
    pages = paginate(256, labels, FONT, cap)
    assert len(pages) > 2
    seen = []
    for page in pages:
        shape = layout(256, labels, page, FONT)
        assert shape.width * shape.height <= cap
        seen += list(shape.cells)
    assert sorted(seen) == sorted((z, y, x) for z in range(2) for y in range(2) for x in range(7))

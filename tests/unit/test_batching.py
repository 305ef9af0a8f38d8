import pytest

from serve_app.model.batch_plan import group_by_shape, plan_pipeline_calls, scatter
from serve_app.protocol import (
    GenerationItem,
    ModelResult,
    flatten_group,
    image_seed,
    split_images,
)


def item(prompt="p", size=512, steps=4, seed=1, call_index=0, count=1):
    return GenerationItem(prompt, size, size, steps, seed, call_index, count)


def test_group_by_shape_keeps_arrival_order():
    items = [item(size=512), item(size=1024), item(size=512, steps=1), item(size=512),
             item(size=1024)]
    groups = group_by_shape(items)
    assert [(g.key, g.indices) for g in groups] == [
        (("txt2img", 512, 512, 4, 1.0), (0, 3)),
        (("txt2img", 1024, 1024, 4, 1.0), (1, 4)),
        (("txt2img", 512, 512, 1, 1.0), (2,)),
    ]


def test_scatter_puts_results_back_in_place():
    items = [item(size=512), item(size=1024), item(size=512)]
    groups = group_by_shape(items)
    assert scatter(groups, [["a0", "a2"], ["b1"]], 3) == ["a0", "b1", "a2"]


def test_scatter_rejects_wrong_counts():
    groups = group_by_shape([item(), item()])
    with pytest.raises(ValueError, match="2 items but 1 results"):
        scatter(groups, [["only"]], 2)
    with pytest.raises(ValueError, match="1 groups but 2 results"):
        scatter(groups, [["a", "b"], ["c"]], 2)


def test_flatten_and_split_round_trip():
    items = [item(prompt="a", count=2), item(prompt="b", count=1, seed=9)]
    prompts, seeds = flatten_group(items)
    assert prompts == ["a", "a", "b"]
    assert seeds == [image_seed(1, 0, 0), image_seed(1, 0, 1), image_seed(9, 0, 0)]
    assert split_images(items, ["x0", "x1", "y0"]) == [["x0", "x1"], ["y0"]]
    with pytest.raises(ValueError, match="expected 3 images, got 2"):
        split_images(items, ["x0", "x1"])


def test_image_seeds_are_stable_and_distinct():
    assert image_seed(42, 0, 0) == image_seed(42, 0, 0)
    seeds = {image_seed(s, i, j) for s in range(4) for i in range(3) for j in range(3)}
    assert len(seeds) == 36
    assert all(0 <= s < 2**63 for s in seeds)


def test_wire_types_round_trip_as_ray_sends_them():
    import pickle

    import numpy as np

    original = item(prompt="x", call_index=2, count=3)
    assert pickle.loads(pickle.dumps(original)) == original
    result = ModelResult(images=[np.zeros((2, 2, 3), np.uint8)], pipeline_s=0.5, batch_size=2)
    back = pickle.loads(pickle.dumps(result))
    assert (back.pipeline_s, back.batch_size, back.error) == (0.5, 2, None)
    assert np.array_equal(back.images[0], result.images[0])


def test_pipeline_calls_are_capped_by_images():
    items = [item(count=3), item(count=3), item(size=1024, count=8), item(count=2),
             item(count=1)]
    calls = plan_pipeline_calls(items, max_images=6)
    assert [(c.key, c.indices) for c in calls] == [
        (("txt2img", 512, 512, 4, 1.0), (0, 1)),
        (("txt2img", 512, 512, 4, 1.0), (3, 4)),
        (("txt2img", 1024, 1024, 4, 1.0), (2,)),  # larger than the cap: runs alone
    ]
    assert [c.indices for c in plan_pipeline_calls(items, max_images=64)] == [
        (0, 1, 3, 4), (2,)]
    groups = plan_pipeline_calls(items, max_images=2)
    assert scatter(groups, [[i for i in g.indices] for g in groups], 5) == [0, 1, 2, 3, 4]


def img2img(size=512, steps=4, strength=0.5, data=b"png"):
    return GenerationItem("p", size, size, steps, 1, init_image=data, strength=strength)


def test_image_to_image_is_grouped_apart_from_text_to_image_and_by_strength():
    items = [item(), img2img(), item(), img2img(data=b"other"), img2img(strength=0.75)]
    groups = group_by_shape(items)
    assert [(g.key, g.indices) for g in groups] == [
        (("txt2img", 512, 512, 4, 1.0), (0, 2)),
        (("img2img", 512, 512, 4, 0.5), (1, 3)),
        (("img2img", 512, 512, 4, 0.75), (4,)),
    ]


def test_image_to_image_runs_only_its_denoising_steps():
    from serve_app.protocol import denoising_steps

    # diffusers skips int(steps - steps x strength) steps of the schedule
    assert [denoising_steps(4, s) for s in (1.0, 0.75, 0.5, 0.3, 0.25)] == [4, 3, 2, 2, 1]
    assert denoising_steps(3, 0.5) == 2
    assert denoising_steps(2, 0.4) == 1
    assert img2img(steps=4, strength=0.5).denoising_steps == 2
    assert item(steps=4).denoising_steps == 4
    assert (item().kind, img2img().kind) == ("txt2img", "img2img")

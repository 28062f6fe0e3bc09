"""The demo's tiny SAM, trained on demo scenes of its own seed, masks the demo's objects."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from hic import demo_world
from hic.demo_training_sam import (
    HELD_OUT_STREAM,
    TRAIN_STREAM,
    SamRecipe,
    example,
    examples,
    held_out_masks,
    train_demo,
    train_sam,
)
from hic.models import ModelRef
from hic.segment import build_tiny_sam, load_sam

# A short run (about 20 s on one core): box prompts start to find their object; the embedded
# default trains SamRecipe() in full.
SHORT = replace(SamRecipe(), steps=150)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sam")
    return out, train_sam(out, SHORT, seed=0, log=lambda _: None)


def pixels(stream: int, n: int) -> list[np.ndarray]:
    return [ex.pixels for _, ex in zip(range(n), examples(stream, 0, SHORT), strict=False)]


def test_training_scenes_are_not_the_demo_run_scenes():
    train, held_out = pixels(TRAIN_STREAM, 3), pixels(HELD_OUT_STREAM, 3)
    # write_world's image stream for the demo seed
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(3)[0])
    demo = [np.asarray(demo_world.render(demo_world.make_scene(rng, 192, 144))) for _ in range(3)]
    for a in train:
        assert not any(a.shape == b.shape and np.array_equal(a, b) for b in held_out + demo)


def test_prompts_ask_for_the_visible_masks():
    rng = np.random.default_rng(0)
    scene = demo_world.make_scene(rng, 192, 144)
    ex = example(scene, SHORT.box_noise, rng)
    assert ex.pixels.shape == (144, 192, 3) and ex.pixels.dtype == np.uint8
    assert len(ex.boxes) == len(ex.box_targets) == len(ex.bboxes)
    # a point on one shown object, then on each band, each inside the mask it asks for
    assert len(ex.points) == 3
    assert any(np.array_equal(ex.point_targets[0], m) for m in ex.box_targets)
    assert np.array_equal(ex.point_targets[1:], demo_world.band_masks(scene))
    for (x, y), target in zip(ex.points.astype(int), ex.point_targets, strict=True):
        assert target[y, x]


def test_training_is_deterministic_and_loads_as_sam(tmp_path):
    tiny = replace(SHORT, steps=2, batch_size=2, warmup=1)
    # through train_demo, the workflow's entry (rule train_demo_model: SAM has no inputs)
    for name in ("a", "b"):
        train_demo(tmp_path / name, {}, seed=0, log=lambda _: None, recipe=tiny)
    a = (tmp_path / "a" / "sam.pth").read_bytes()
    assert a == (tmp_path / "b" / "sam.pth").read_bytes()
    sam = load_sam(ModelRef(str(tmp_path / "a")), device="cpu")
    assert not sam.training


def test_trained_sam_beats_the_random_one_on_held_out_box_prompts(trained, tmp_path):
    out, summary = trained
    assert summary["steps_done"] == SHORT.steps
    build_tiny_sam(tmp_path / "random")
    learned = held_out_masks(out, n=20)
    random = held_out_masks(tmp_path / "random", n=20)
    # measured at this budget (60 scenes): mask IoU 0.08 vs 0.02, boxes kept 0.14 vs 0
    assert learned["box_mask_iou"] >= random["box_mask_iou"] + 0.04
    assert learned["box_kept"] >= random["box_kept"] + 0.08

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from conftest import file_digests
from hic.models import ModelRef, ModelUnavailableError
from hic.segment import (
    TINY_SAM_CONFIG,
    EncodeOnce,
    background_masks,
    box_masks,
    build_tiny_sam,
    load_sam,
)

# Non-square and smaller than the tiny model's input, so resizing back to image pixels matters.
WIDTH, HEIGHT = 96, 72
BOXES = [[4.0, 6.0, 30.0, 20.0], [40.0, 10.0, 50.0, 55.0], [10.5, 40.25, 20.0, 25.0]]
# Thresholds at 0: a randomly initialised SAM never passes the real model's quality thresholds.
NO_QUALITY_FILTER = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny-sam"
    build_tiny_sam(out, seed=0)
    return out


@pytest.fixture(scope="module")
def sam(tiny_dir) -> Sam:
    return load_sam(ModelRef(str(tiny_dir)), device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Sky over grass with a red block: a few flat regions for SAM to split."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[: HEIGHT // 2] = (120, 170, 235)
    pixels[HEIGHT // 2 :] = (60, 150, 50)
    pixels[20:50, 30:60] = (200, 30, 30)
    return pixels


def test_build_is_reproducible_per_seed_and_keeps_the_global_rng(tmp_path, tiny_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sam(tmp_path / "again", seed=0)
    build_tiny_sam(tmp_path / "other", seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert file_digests(tmp_path / "again") == file_digests(tiny_dir)
    assert file_digests(tmp_path / "other")["sam.pth"] != file_digests(tiny_dir)["sam.pth"]


def test_tiny_folder_loads_as_segment_anything_sam(sam):
    assert isinstance(sam, Sam)
    assert sam.image_encoder.img_size == TINY_SAM_CONFIG["img_size"]
    assert not sam.training


@pytest.mark.parametrize(
    "ref",
    [ModelRef("resources/models/no-such-sam"), ModelRef("no-such-org/no-such-sam", "abc123")],
)
def test_unavailable_model_names_the_reference_and_the_fixes(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelUnavailableError) as err:
        load_sam(ref, device="cpu")
    message = str(err.value)
    assert repr(ref.id) in message
    assert "build_tiny_model" in message
    assert f"hf download {ref.id} sam_vit_b_01ec64.pth --revision {ref.revision or 'main'}" in (
        message
    )


def test_a_hub_checkpoint_must_match_the_md5_in_its_name(tiny_dir, tmp_path, monkeypatch):
    weights = tiny_dir / "sam.pth"
    prefix = hashlib.md5(weights.read_bytes()).hexdigest()[:6]
    monkeypatch.setattr("hic.segment.hf_hub_download", lambda repo, name, revision: weights)
    # The tiny weights under a name carrying their own MD5 prefix pass the check (and then
    # fail to load into ViT-B: another error, about the state dict, not the file's identity).
    with pytest.raises(RuntimeError, match="state_dict"):
        load_sam(ModelRef("org/sam"), checkpoint=f"sam_vit_b_{prefix}.pth", device="cpu")
    with pytest.raises(
        ModelUnavailableError, match=f"its MD5 starts {prefix}, the name says 01ec64"
    ):
        load_sam(ModelRef("org/sam"), checkpoint="sam_vit_b_01ec64.pth", device="cpu")


def test_box_masks_give_tight_boxes_in_image_pixels(sam, image):
    results = box_masks(EncodeOnce(sam), image, BOXES)
    assert len(results) == len(BOXES)
    for (x, y, w, h), area in results:
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= WIDTH and y + h <= HEIGHT
        assert 0 <= area <= WIDTH * HEIGHT
        # A mask's pixels fit in its tight box; only an empty mask falls back to the prompt box.
        assert area <= w * h
    assert box_masks(EncodeOnce(sam), image, []) == []


def test_background_masks_are_large_uncovered_and_largest_first(sam, image):
    found = background_masks(
        EncodeOnce(sam), image, min_area_fraction=0.05, covered=[], **NO_QUALITY_FILTER
    )
    assert found
    areas = [area for _, area in found]
    assert areas == sorted(areas, reverse=True)
    assert min(areas) >= 0.05 * WIDTH * HEIGHT
    for x, y, w, h in (box for box, _ in found):
        assert 0 <= x and 0 <= y and x + w <= WIDTH and y + h <= HEIGHT


def test_background_masks_skip_masks_inside_the_object_boxes(sam, image):
    kwargs = {**NO_QUALITY_FILTER, "min_area_fraction": 0.0}
    uncovered = background_masks(EncodeOnce(sam), image, covered=[], **kwargs)
    some = background_masks(EncodeOnce(sam), image, covered=BOXES[:1], **kwargs)
    assert set(map(str, some)) <= set(map(str, uncovered))
    everything = [[0.0, 0.0, float(WIDTH), float(HEIGHT)]]
    assert background_masks(EncodeOnce(sam), image, covered=everything, **kwargs) == []


def _count_encodings(sam: Sam) -> list[int]:
    calls = [0]
    sam.image_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_box_prompts_and_automatic_masks_share_one_encoding(tiny_dir, image):
    sam = load_sam(ModelRef(str(tiny_dir)), device="cpu")
    calls = _count_encodings(sam)
    predictor = EncodeOnce(sam)
    boxes = box_masks(predictor, image, BOXES)
    kwargs = {**NO_QUALITY_FILTER, "min_area_fraction": 0.05, "covered": []}
    background = background_masks(predictor, image.copy(), **kwargs)
    assert calls[0] == 1
    # The same answers as predictors that encode the image themselves.
    assert boxes == box_masks(EncodeOnce(sam), image, BOXES)
    plain = SamPredictor(sam)
    assert background == background_masks(plain, image, **kwargs)
    # Another image is encoded anew, and its masks are its own.
    other = image[::-1].copy()
    assert box_masks(predictor, other, BOXES) == box_masks(EncodeOnce(sam), other, BOXES)

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hic.caption_scene import SCENE_SCHEMA
from hic.download import STATUS_SCHEMA
from hic.models import ModelRef
from hic.propose_regions import (
    Detector,
    ProposeSettings,
    caption_objects,
    image_proposals,
    propose_shard,
    to_original,
)
from hic.region_tables import PROPOSAL_SCHEMA
from hic.segment import build_tiny_sam, load_sam
from hic.tiny_models import build_tiny_owlv2

VOCAB = {"things": ["dog", "teddy bear", "bus", "box", "glass"], "stuff": ["sky", "night sky"]}
TINY = ProposeSettings(
    detector_threshold=0.0,
    top_k=1,
    points_per_side=4,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    min_background_fraction=0.0,
    background_iou=0.0,
)


NO_NOUN = "and so it is, very much so"  # a caption that names nothing


def test_caption_objects_finds_multiword_names_first_in_order_of_mention():
    text = "Two Teddy bears and three dogs sit under the night sky; a dog barks near buses."
    names = VOCAB["things"] + VOCAB["stuff"]
    assert caption_objects(text, names) == ["teddy bear", "dog", "night sky", "bus"]
    assert caption_objects("glasses and boxes", names) == ["glass", "box"]
    assert caption_objects(None, names) == []
    assert caption_objects(NO_NOUN, names) == []
    # vocabulary names match whole words only: no "dog" in "hotdog"
    assert caption_objects("A hotdog stand.", names) == ["hotdog stand"]


@pytest.mark.parametrize(
    ("plural", "name"),
    [
        ("women", "woman"),
        ("men", "man"),
        ("children", "child"),
        ("knives", "knife"),
        ("leaves", "leaf"),
        ("mice", "mouse"),
        ("shelves", "shelf"),
        ("puppies", "puppy"),
        ("buses", "bus"),
    ],
)
def test_caption_objects_lemmatises_irregular_plurals_of_vocabulary_names(plural, name):
    assert caption_objects(f"Several {plural} on a table.", [name, "table"]) == [name, "table"]


# Sentences written like the paper's long captions (Fig. 1 labels an "artist").
@pytest.mark.parametrize(
    ("caption", "names"),
    [
        ("A surfer rides a wave in the ocean.", ["surfer", "wave", "ocean"]),
        (
            "An artist in a paint-stained apron works on a large canvas propped on an easel, "
            "while brushes and jars of paint crowd a table beside her.",
            ["artist", "apron", "canvas", "easel", "brush", "jar", "table"],
        ),
        (
            "Two women and three children walk along the beach, holding kites as fallen "
            "leaves drift past them.",
            ["woman", "child", "beach", "kite", "leaf"],
        ),
        (
            "A man holding an umbrella stands next to a fire hydrant on the left side of the "
            "image.",
            ["man", "umbrella", "fire hydrant"],
        ),
        (
            "A red double-decker bus drives down a busy street lined with tall buildings "
            "under a cloudy sky.",
            ["double-decker bus", "street", "building", "sky"],
        ),
        (
            "The dogs bark at a cat sitting on a wooden bench, and surfers ride waves near "
            "the shore.",
            ["dog", "cat", "bench", "surfer", "wave", "shore"],
        ),
    ],
)
def test_caption_objects_takes_the_head_nouns_of_the_captions_noun_phrases(caption, names):
    # the curated list knows none of these names but "table", "sky" and "ocean"
    assert caption_objects(caption, ["table", "sky", "ocean"]) == names


def test_to_original_scales_each_axis():
    assert to_original([10, 20, 30, 40], 2.0, 0.5) == [20, 10, 60, 20]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_owlv2(root / "owlv2")
    build_tiny_sam(root / "sam")
    return Detector(ModelRef(str(root / "owlv2"))), load_sam(ModelRef(str(root / "sam")))


def write_shard(folder, captions, widths=None):
    """Images stored at half their original size, as a resizing download would."""
    keys = [f"{i:016x}" for i in range(len(captions))]
    widths = widths or [60] * len(keys)
    with tarfile.open(folder / "s.tar", "w") as tar:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 255, (40, widths[i], 3), np.uint8)
            Image.fromarray(pixels).save(buf, "JPEG")
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    status = [
        {
            "key": k,
            "status": "success",
            "width": 60,
            "height": 40,
            "original_width": 120,
            "original_height": 80,
        }
        for k in keys
    ]
    pq.write_table(pa.Table.from_pylist(status, schema=STATUS_SCHEMA), folder / "s.parquet")
    scene = [
        {"key": k, "status": "ok", "long_caption": c} for k, c in zip(keys, captions, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(scene, schema=SCENE_SCHEMA), folder / "scene.parquet")


def propose(folder, models, settings, out="p.parquet", flush_every=8):
    """propose_shard on the shard write_shard made in ``folder``."""
    detector, sam = models
    return propose_shard(
        folder / "s.tar",
        folder / "s.parquet",
        folder / "scene.parquet",
        folder / out,
        VOCAB,
        detector,
        sam,
        settings,
        {"detector": "tiny", "sam": "tiny"},
        flush_every,
    )


def test_propose_shard_boxes_are_in_original_pixels(models, tmp_path):
    write_shard(tmp_path, ["A dog under the sky.", NO_NOUN, None])
    summary = propose(tmp_path, models, TINY)
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.schema == PROPOSAL_SCHEMA
    rows = table.to_pylist()
    assert summary["query_source"] == {"caption": 1, "vocabulary": 2, "none": 0}
    first = [r for r in rows if r["key"] == f"{0:016x}"]
    assert {r["label"] for r in first} <= {"dog", "sky"} and first
    assert {r["query_source"] for r in first} == {"caption"}
    for r in rows:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= 120 + 1e-6 and y + h <= 80 + 1e-6  # original size, not the stored 60x40
        assert r["kind"] == ("background" if r["label"] in VOCAB["stuff"] else "foreground")
    assert any(r["bbox"][0] + r["bbox"][2] > 60 or r["bbox"][1] + r["bbox"][3] > 40 for r in rows)


def test_sam_masks_for_background_take_the_detected_background_name(models):
    _, sam = models
    pixels = np.zeros((72, 96, 3), np.uint8)
    pixels[:36], pixels[36:] = (120, 170, 235), (60, 150, 50)  # sky over grass
    image = Image.fromarray(pixels)
    settings = ProposeSettings(**{**TINY.__dict__, "points_per_side": 8})
    sky = [{"label": "sky", "bbox": [0.0, 0.0, 96.0, 36.0], "score": 0.4}]
    rows = image_proposals(image, sky, {"sky"}, sam, settings)
    auto = [r for r in rows if r["source"] == "sam_auto"]
    assert auto, rows
    for r in auto:
        assert (r["label"], r["kind"], r["score"]) == ("sky", "background", 0.4)
        x, y, w, h = r["bbox"]
        assert 0 < r["mask_area"] <= w * h and x + w <= 96 and y + h <= 72
    # No detected background name, no automatic masks: a mask needs a label.
    assert all(
        r["source"] != "sam_auto" for r in image_proposals(image, [], {"sky"}, sam, settings)
    )


def test_fallback_none_skips_images_whose_caption_names_nothing(models, tmp_path):
    write_shard(tmp_path, [NO_NOUN])
    summary = propose(tmp_path, models, ProposeSettings(**{**TINY.__dict__, "fallback": "none"}))
    assert summary["query_source"]["none"] == 1 and summary["proposals"] == 0
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 0


class Counting:
    """The tiny detector, recording the images it is shown (by width) and dying (as if
    killed) at its ``die_at``-th call."""

    def __init__(self, detector, die_at=None):
        self.detector, self.die_at, self.calls, self.widths = detector, die_at, 0, []

    def detect(self, images, queries, threshold, top_k):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        self.widths += [image.width for image in images]
        return self.detector.detect(images, queries, threshold, top_k)


def test_a_killed_proposal_run_resumes_without_detecting_an_image_twice(models, tmp_path):
    detector, sam = models
    captions = ["A dog under the sky.", "noise words only", "A bus.", "A teddy bear in a box."]
    write_shard(tmp_path, captions, widths=[60, 61, 62, 63])
    settings = ProposeSettings(**{**TINY.__dict__, "batch_size": 1, "fallback": "none"})
    whole = propose(tmp_path, models, settings, out="whole.parquet")
    # Image 1 names nothing: no detector call. Dies on image 3, after images 0-2 were flushed.
    with pytest.raises(KeyboardInterrupt):
        propose(tmp_path, (Counting(detector, die_at=3), sam), settings, flush_every=1)
    counting = Counting(detector)
    summary = propose(tmp_path, (counting, sam), settings, flush_every=1)
    assert counting.widths == [63] and summary["resumed_images"] == 3
    assert {k: v for k, v in summary.items() if k != "resumed_images"} == {
        k: v for k, v in whole.items() if k != "resumed_images"
    }
    assert summary["query_source"] == {"caption": 3, "vocabulary": 0, "none": 1}
    assert (tmp_path / "p.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert not (tmp_path / "p.parquet.parts").exists()

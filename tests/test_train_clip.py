import io
import json
import os
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hic.demo_world import REFERENCE_SCHEMA
from hic.train_clip import (
    TrainSettings,
    caption_for,
    crop_to,
    input_identity,
    param_groups,
    train,
)

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images in a download-style tar and their annotations in the HIC release format."""
    root = tmp_path_factory.mktemp("clipdata")
    rows = []
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(12):
            key, colour = f"{i:016x}", COLOURS[i % 4]
            buf = io.BytesIO()
            Image.new("RGB", (48, 32), colour).save(buf, "JPEG")
            for ext, payload in [("jpg", buf.getvalue()), ("txt", f"img {i}".encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            rows.append(
                {
                    "key": key,
                    "url": f"http://x/{i}.jpg",
                    "width": 96,
                    "height": 64,
                    "short_caption": f"A {colour} picture.",
                    "long_caption": f"A plain {colour} picture with nothing else in it, no. {i}.",
                    "regions": [
                        {
                            "label": "square",
                            "bbox": [0.0, 0.0, 48.0, 32.0],
                            "caption": f"A {colour} square.",
                            "kind": "foreground",
                            "score": 1.0,
                        }
                    ],
                    "source": "test",
                    "seed": 0,
                }
            )
    pq.write_table(pa.Table.from_pylist(rows, schema=REFERENCE_SCHEMA), root / "ref.parquet")
    sizes = {r["key"]: (96, 64) for r in rows}
    return [root / "00000.tar"], [root / "ref.parquet"], sizes


SETTINGS = TrainSettings(
    arch="HIC-Tiny-CLIP",
    policy="hierarchical",
    epochs=2,
    batch_size=4,
    warmup=1,
    checkpoint_every=2,
    seed=3,
)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_resumed_training_matches_an_uninterrupted_run(data, tmp_path):
    tars, annotations, sizes = data
    whole = train(tars, annotations, sizes, tmp_path / "whole", SETTINGS)
    assert whole == {
        "steps": 6,
        "total_steps": 6,
        "steps_per_epoch": 3,
        "samples_per_epoch": 12,
        "left_out": {},
    }

    part = train(tars, annotations, sizes, tmp_path / "resumed", SETTINGS, max_steps=3)
    assert part["steps"] == 3 and not (tmp_path / "resumed/model.pt").exists()
    train(tars, annotations, sizes, tmp_path / "resumed", SETTINGS)  # resumes at step 3

    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [(m["step"], m["loss"]) for m in metrics(tmp_path / "whole")]
    assert [(m["step"], m["loss"]) for m in metrics(tmp_path / "resumed")] == losses
    params = (tmp_path / "whole/params.txt").read_text()
    assert "policy: hierarchical" in params and "seed: 3" in params


def test_a_checkpoint_of_other_data_is_not_resumed(data, tmp_path):
    tars, annotations, sizes = data
    fresh = train(tars, annotations, sizes, tmp_path / "fresh", SETTINGS, data_id="new")
    # A killed job trained on other captions; then its annotations were rebuilt.
    old = pq.read_table(annotations[0]).to_pylist()
    for row in old:
        row["long_caption"] = row["short_caption"] = "An old caption of a picture."
    old_file = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist(old, schema=REFERENCE_SCHEMA), old_file)
    train(tars, [old_file], sizes, tmp_path / "stale", SETTINGS, data_id="old", max_steps=3)
    again = train(tars, annotations, sizes, tmp_path / "stale", SETTINGS, data_id="new")
    assert again == fresh
    a = torch.load(tmp_path / "fresh/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "stale/model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in metrics(tmp_path / "stale")]
    assert steps == list(range(1, 7))


def test_input_identity_changes_when_an_input_is_rewritten(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"one")
    before = input_identity([path])
    assert input_identity([path]) == before
    os.utime(path, ns=(0, 0))
    assert input_identity([path]) != before


def test_too_little_data_is_explained(data, tmp_path):
    tars, annotations, sizes = data
    big = TrainSettings(**{**SETTINGS.__dict__, "batch_size": 64})
    with pytest.raises(ValueError, match="no full batch of 64"):
        train(tars, annotations, sizes, tmp_path, big)
    # Images with no annotation are counted as left out, and the error says so.
    two = pq.read_table(annotations[0]).slice(0, 2)
    pq.write_table(two, tmp_path / "two.parquet")
    with pytest.raises(ValueError, match=r"2 samples; left out: \{'no annotation': 10\}"):
        train(tars, [tmp_path / "two.parquet"], sizes, tmp_path / "two", SETTINGS)


RECORD = {
    "short_caption": "short",
    "long_caption": "long",
    "regions": [{"label": "cup", "caption": "A cup.", "bbox": [0, 0, 1, 1]}],
}


def test_caption_policies():
    rng = random.Random(0)
    mix = {"short": 1, "long": 1, "region": 1}
    assert caption_for("alt", "alt text", RECORD, rng, mix) == ("alt text", None)
    assert caption_for("alt", "", RECORD, rng, mix) == (None, None)
    assert caption_for("long", "", RECORD, rng, mix) == ("long", None)
    text, region = caption_for("regions", "", RECORD, rng, mix)
    assert text == "cup. A cup." and region["label"] == "cup"
    seen = {caption_for("hierarchical", "", RECORD, random.Random(s), mix)[0] for s in range(50)}
    assert seen == {"short", "long", "cup. A cup."}
    only_long = {"short": 0, "long": 1, "region": 0}
    assert caption_for("hierarchical", "", RECORD, rng, only_long) == ("long", None)
    bare = {"short_caption": None, "long_caption": None, "regions": []}
    assert caption_for("hierarchical", "", bare, rng, mix) == (None, None)


def test_mix_lists_weights_and_an_unlisted_kind_weighs_zero():
    assert TrainSettings(mix={"long": 2}).mix == {"short": 0.0, "long": 2.0, "region": 0.0}
    for bad in ({"long": 0}, {"short": -1, "long": 2}, {"regions": 1}):
        with pytest.raises(ValueError, match="must give non-negative weights"):
            TrainSettings(mix=bad)


def test_no_weight_decay_on_gains_biases_and_temperature():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4)
    model.ln_final = torch.nn.LayerNorm(4)
    model.logit_scale = torch.nn.Parameter(torch.ones([]))
    free, decayed = param_groups(model, 0.2)
    assert decayed["weight_decay"] == 0.2 and decayed["params"] == [model.proj.weight]
    assert free["weight_decay"] == 0.0 and len(free["params"]) == 4


def test_crop_to_maps_original_pixels_to_the_stored_image():
    stored = Image.new("RGB", (100, 50))  # original 200x100
    assert crop_to(stored, [50, 20, 100, 50], (200, 100)).size == (60, 30)

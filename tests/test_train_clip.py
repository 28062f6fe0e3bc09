import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hic.demo_world import REFERENCE_SCHEMA
from hic.train_clip import (
    Shard,
    TrainSettings,
    _NotPlainTar,
    _tar_members,
    caption_for,
    count_samples,
    crop_to,
    epoch_order,
    input_identity,
    load_image,
    pair_shards,
    tar_images,
    train,
    write_job,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

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
            image = Image.new("RGB", (48, 32), colour)
            image.paste("black", (4 * i % 40, 0, 4 * i % 40 + 8, 16))  # crops must differ
            image.save(buf, "JPEG")
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
    write_status(root / "00000.parquet", [r["key"] for r in rows])
    return pair_shards([root / "00000.tar"], [root / "ref.parquet"], aligned=False)


def write_status(path, keys, status="success"):
    """The download stage's status table of ``keys``: alt text and original size."""
    rows = [
        {
            "key": k,
            "status": status,
            "caption": f"img {int(k, 16)}",
            "original_width": 96,
            "original_height": 64,
        }
        for k in keys
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


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
    whole = train(data, tmp_path / "whole", SETTINGS)
    assert whole == {
        "steps": 6,
        "total_steps": 6,
        "steps_per_epoch": 3,
        "samples_per_epoch": 12,
        "left_out": {},
    }

    part = train(data, tmp_path / "resumed", SETTINGS, max_steps=3)
    assert part["steps"] == 3 and not (tmp_path / "resumed/model.pt").exists()
    train(data, tmp_path / "resumed", SETTINGS, workers=2)  # resumes at step 3, in 2 workers

    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [(m["step"], m["loss"]) for m in metrics(tmp_path / "whole")]
    assert [(m["step"], m["loss"]) for m in metrics(tmp_path / "resumed")] == losses
    params = (tmp_path / "whole/params.txt").read_text()
    assert "policy: hierarchical" in params and "seed: 3" in params


def test_a_checkpoint_of_other_data_is_not_resumed(data, tmp_path):
    fresh = train(data, tmp_path / "fresh", SETTINGS, data_id="new")
    # A killed job trained on other captions; then its annotations were rebuilt.
    old = pq.read_table(data[0].annotations[0]).to_pylist()
    for row in old:
        row["long_caption"] = row["short_caption"] = "An old caption of a picture."
    old_file = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist(old, schema=REFERENCE_SCHEMA), old_file)
    old_data = [replace(data[0], annotations=(old_file,))]
    train(old_data, tmp_path / "stale", SETTINGS, data_id="old", max_steps=3)
    again = train(data, tmp_path / "stale", SETTINGS, data_id="new")
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
    big = TrainSettings(**{**SETTINGS.__dict__, "batch_size": 64})
    with pytest.raises(ValueError, match="no full batch of 64"):
        train(data, tmp_path, big)
    # Images with no annotation are counted as left out, and the error says so.
    two = pq.read_table(data[0].annotations[0]).slice(0, 2)
    pq.write_table(two, tmp_path / "two.parquet")
    shards = [replace(data[0], annotations=(tmp_path / "two.parquet",))]
    with pytest.raises(ValueError, match=r"2 samples; left out: \{'no annotation': 10\}"):
        train(shards, tmp_path / "two", SETTINGS)


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


def test_crop_to_maps_original_pixels_to_the_stored_image():
    stored = Image.new("RGB", (100, 50))  # original 200x100
    assert crop_to(stored, [50, 20, 100, 50], (200, 100)).size == (60, 30)


def test_two_ranks_under_torchrun_train_as_one_process(data, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank takes half of every batch; the loss is the
    global batch's, so the loss curve and weights are those of one process."""
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 1})
    one = train(data, tmp_path / "one", settings)
    write_job(tmp_path / "job.json", data, tmp_path / "two", settings, workers=1)
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "hic.train_clip", str(tmp_path / "job.json")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "rank 0 of 2" in run.stderr and "rank 1 of 2" in run.stderr
    assert json.loads((tmp_path / "two/summary.json").read_text()) == one
    curve = [m["loss"] for m in metrics(tmp_path / "one")]
    assert [m["loss"] for m in metrics(tmp_path / "two")] == pytest.approx(curve, abs=1e-4)
    a = torch.load(tmp_path / "one/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two/model.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_tar_images_reads_headers_only_and_matches_tarfile(tmp_path):
    """Plain ustar headers are parsed directly; a pax header (a name over 100 bytes) sends
    the tar to ``tarfile``; both give each sample's image in tar order, jpg before png."""
    long_key = "d" * 120
    for name, keys in (("plain.tar", ["b", "a", "c"]), ("pax.tar", ["b", long_key])):
        with tarfile.open(tmp_path / name, "w", format=tarfile.PAX_FORMAT) as tar:
            for key in keys:
                for ext, payload in (("txt", b"alt"), ("png", b"PNG!"), ("jpg", key.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            info = tarfile.TarInfo("c.json")  # a sample with no image
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
        images = tar_images(tmp_path / name)
        plain = next(_tar_members(tmp_path / "plain.tar"), None)
        assert plain is not None  # parsed directly
        if name == "pax.tar":
            with pytest.raises(_NotPlainTar):
                list(_tar_members(tmp_path / name))
        assert [key for key, _, _ in images] == keys
        with open(tmp_path / name, "rb") as f:
            for key, offset, size in images:
                f.seek(offset)
                assert f.read(size) == key.encode()  # the jpg, not the png


def test_a_downloaded_image_missing_from_its_tar_is_an_error(data, tmp_path):
    keys = pq.read_table(data[0].status).column("key").to_pylist()
    write_status(tmp_path / "00000.parquet", [*keys, "ffffffffffffffff"])
    annotations = pq.read_table(data[0].annotations[0]).to_pylist()
    annotations.append({**annotations[0], "key": "ffffffffffffffff"})
    pq.write_table(
        pa.Table.from_pylist(annotations, schema=REFERENCE_SCHEMA), tmp_path / "ref.parquet"
    )
    shard = Shard(data[0].tar, tmp_path / "00000.parquet", (tmp_path / "ref.parquet",))
    assert count_samples([shard], SETTINGS)[0] == [13]  # counted from the tables
    with pytest.raises(ValueError, match=r"00000.tar lacks the images of 1 samples"):
        list(epoch_order([shard], SETTINGS, 0))


def test_counts_and_order_come_from_the_tables_and_headers(data, tmp_path):
    """Only status ``success`` rows count; an aligned shard reads its own annotation file;
    the order is a function of (seed, epoch)."""
    keys = pq.read_table(data[0].status).column("key").to_pylist()
    write_status(tmp_path / "00000.parquet", keys[:9])
    failed = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    failed += [{**failed[0], "key": k, "status": "failed_to_download"} for k in keys[9:]]
    pq.write_table(pa.Table.from_pylist(failed), tmp_path / "00000.parquet")
    (shard,) = pair_shards([tmp_path / "00000.tar"], data[0].annotations, aligned=True)
    assert shard.annotations == data[0].annotations
    shard = replace(shard, tar=data[0].tar)
    assert count_samples([shard], SETTINGS) == ([9], Counter())
    alt = TrainSettings(**{**SETTINGS.__dict__, "policy": "alt"})
    blank = pq.read_table(shard.status).to_pylist()
    blank[0]["caption"] = ""
    pq.write_table(pa.Table.from_pylist(blank), shard.status)
    assert count_samples([shard], alt) == ([8], Counter({"no caption for policy alt": 1}))

    def order(epoch):
        return [rows["key"][row].as_py() for rows, row, *_ in epoch_order(data, SETTINGS, epoch, 4)]

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == keys
    with pytest.raises(ValueError, match="cannot align"):
        pair_shards([tmp_path / "00000.tar"], [], aligned=True)


def test_reduced_jpeg_decoding_keeps_the_crop_above_the_input_size():
    buf = io.BytesIO()
    Image.new("RGB", (768, 576), "red").save(buf, "JPEG")
    jpeg = buf.getvalue()
    assert load_image(jpeg, None, None).size == (768, 576)
    assert load_image(jpeg, None, None, min_side=280).size == (384, 288)
    assert load_image(jpeg, None, None, min_side=64).size == (96, 72)
    # A region 200 px wide in a 1536-px original (100 stored px): decoded whole.
    region = load_image(jpeg, [0, 0, 200, 200], (1536, 1152), min_side=64)
    assert region.size == crop_to(Image.new("RGB", (768, 576)), [0, 0, 200, 200], (1536, 1152)).size
    buf = io.BytesIO()
    Image.new("RGB", (768, 576), "red").save(buf, "PNG")  # no draft mode for PNG
    assert load_image(buf.getvalue(), None, None, min_side=64).size == (768, 576)


def test_the_count_pass_reads_the_release_word_counts_not_its_text(data, tmp_path):
    keys = pq.read_table(data[0].status).column("key").to_pylist()
    words = pa.table(
        {
            "key": keys,
            "short_words": [0] * 4 + [5] * 8,
            "long_words": [0] * 6 + [40] * 6,
            "region_words": [[]] * 10 + [[0, 3]] * 2,
        }
    )  # no caption column at all: counting must not need one
    pq.write_table(words, tmp_path / "release.parquet")
    shard = replace(data[0], annotations=(tmp_path / "release.parquet",))
    only = {"short": 1, "long": 1, "region": 0}
    counts = {
        policy: count_samples([shard], TrainSettings(policy=policy, mix=only))[0]
        for policy in ("short", "long", "regions", "hierarchical")
    }
    assert counts == {"short": [8], "long": [6], "regions": [2], "hierarchical": [8]}

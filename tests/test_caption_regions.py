import json
from functools import partial

import pytest
from PIL import Image

from conftest import region_shard
from hic.caption_regions import (
    RegionCaptionSettings,
    caption_batch,
    caption_regions_shard,
    shape_caption,
)
from hic.decoding import GREEDY, Generation


class Scripted:
    """Answers in order: a text the model ended, or a Generation."""

    decoding = GREEDY

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def generate(self, images, prompts, max_new_tokens):
        self.prompts += prompts
        answers = [self.answers.pop(0) for _ in prompts]
        return [a if isinstance(a, Generation) else Generation(a, "stop") for a in answers]


def views(labels):
    return [({"key": "k", "label": x}, Image.new("RGB", (8, 8))) for x in labels]


def test_captions_are_shaped_and_garbage_is_unparsed():
    backend = Scripted(
        [
            "Dog. A brown dog lies on the grass next to a bench",
            "A small grey cat sleeps on the sofa.",
            "### 123 !!!",
        ]
    )
    rows = caption_batch(
        views(["dog", "cat", "sky"]),
        backend,
        "Caption the {label} in the {colour} box.",
        RegionCaptionSettings(words=[4, 120]),  # lengths: test_caption_lengths
    )
    assert [r["caption_status"] for r in rows] == ["ok", "ok", "unparsed"]
    assert rows[0]["raw_caption"] == "Dog. A brown dog lies on the grass next to a bench."
    assert rows[1]["raw_caption"] == "Cat. A small grey cat sleeps on the sofa."
    assert rows[2]["raw_caption"] is None and rows[2]["caption_model_output"] == "### 123 !!!"
    assert rows[2]["caption_reason"].startswith("region: not text")
    assert backend.prompts[0] == "Caption the dog in the red box."


def test_shape_caption():
    assert shape_caption("tree. Tall and green.", "tree") == "tree. Tall and green."
    assert shape_caption("Tall and green", "tree") == "Tree. Tall and green."
    # The label opens the caption only when a separator follows it as a word.
    assert shape_caption("Doghouse in the garden", "dog") == "Dog. Doghouse in the garden."
    assert shape_caption("Dog lying on grass", "dog") == "Dog. Dog lying on grass."
    assert shape_caption("Dog: a brown dog", "dog") == "Dog: a brown dog."


def test_cut_off_and_looping_captions_are_marked_not_ok():
    cut = "Sign. A sign with white text (including"
    loop = "A red sign on a pole. " * 10
    good = "A red sign stands on a pole by the road."
    backend = Scripted([Generation(cut, "length"), loop, good])
    rows = caption_batch(
        views(["sign", "sign", "sign"]),
        backend,
        "{label}",
        RegionCaptionSettings(batch_size=3, words=[4, 120]),
    )
    assert [r["caption_status"] for r in rows] == ["truncated", "repetitive", "ok"]
    assert rows[0]["raw_caption"] is None  # no "(including." with a full stop appended
    assert rows[0]["caption_model_output"] == cut
    assert rows[1]["caption_reason"].startswith("repetitive")
    recorded = json.loads(rows[2]["caption_generation"])
    assert recorded == {
        "do_sample": False,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "max_new_tokens": 192,
    }


class Counting:
    """A caption naming the region's label; records the labels it is asked about, and dies (as
    if killed) at its ``die_at``-th call."""

    decoding = GREEDY

    def __init__(self, die_at: int | None = None):
        self.die_at, self.calls, self.asked = die_at, 0, []

    def generate(self, images, prompts, max_new_tokens):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        labels = [p.split()[2] for p in prompts]
        self.asked += labels
        texts = [f"{x}. A plain thing with a label of its own, seen from the side." for x in labels]
        return [Generation(text, "stop") for text in texts]


PROMPT = "Caption the {label} in the {colour} box."
# Regions by image, in tar order; the second image has none. Batches of 2: [r0 r1] [r2 r3]
# [r4 r5] [r6].
LABELS = [["r0", "r1", "r2"], [], ["r3"], ["r4", "r5"], ["r6"]]


def killed_shard(tmp_path):
    """A shard, its uninterrupted captions, and a run killed after two flushed batches."""
    regions, tar, status = region_shard(tmp_path, LABELS)
    caption = partial(
        caption_regions_shard,
        regions,
        tar,
        status,
        settings=RegionCaptionSettings(batch_size=2, words=[4, 120]),
        identity={"model": "scripted"},
        flush_every=1,
    )
    caption(out=tmp_path / "whole.parquet", prompt=PROMPT, backend=Counting())
    with pytest.raises(KeyboardInterrupt):
        caption(out=tmp_path / "captioned.parquet", prompt=PROMPT, backend=Counting(die_at=3))
    return caption


def test_a_killed_captioning_resumes_without_captioning_a_region_twice(tmp_path):
    caption = killed_shard(tmp_path)
    backend = Counting()
    summary = caption(out=tmp_path / "captioned.parquet", prompt=PROMPT, backend=backend)
    assert backend.asked == ["r4", "r5", "r6"]
    assert summary == {"regions": 7, "ok": 7, "resumed_regions": 4}
    whole = (tmp_path / "whole.parquet").read_bytes()
    assert (tmp_path / "captioned.parquet").read_bytes() == whole
    assert not (tmp_path / "captioned.parquet.parts").exists()


def test_caption_parts_of_another_prompt_are_discarded(tmp_path):
    caption = killed_shard(tmp_path)
    backend = Counting()
    other = "Caption the {label} outlined in {colour}."
    caption(out=tmp_path / "captioned.parquet", prompt=other, backend=backend)
    assert backend.asked == [f"r{i}" for i in range(7)]

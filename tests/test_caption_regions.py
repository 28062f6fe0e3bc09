import json

from PIL import Image

from hic.caption_regions import RegionCaptionSettings, caption_regions, shape_caption
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
    rows = caption_regions(
        views(["dog", "cat", "sky"]),
        backend,
        "Caption the {label} in the {colour} box.",
        RegionCaptionSettings(batch_size=2, words=[4, 120]),  # lengths: test_caption_lengths
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
    rows = caption_regions(
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

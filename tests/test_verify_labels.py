import json

import pytest
from PIL import Image

from hic.decoding import GREEDY, Generation
from hic.verify_labels import VerifySettings, parse_label, verify_regions

PROMPTS = {"verify": "Is {label} in the {colour} box?", "correct": "Not {label}; what is it?"}


class Scripted:
    """P(yes) per label, and a fixed answer to the correction question."""

    decoding = GREEDY

    def __init__(self, p_yes: dict[str, float], answer: str | Generation):
        self.p_yes, self.answer, self.generated = p_yes, answer, []

    def choice_probabilities(self, images, prompts, choices):
        assert choices == ("yes", "no")
        labels = [p.split()[1] for p in prompts]
        return [{"yes": self.p_yes[x], "no": 1 - self.p_yes[x]} for x in labels]

    def generate(self, images, prompts, max_new_tokens):
        self.generated += prompts
        answer = self.answer
        return [answer if isinstance(answer, Generation) else Generation(answer, "stop")] * len(
            prompts
        )


def views(labels):
    return [
        ({"key": "k", "label": x, "rank": i}, Image.new("RGB", (8, 8)))
        for i, x in enumerate(labels)
    ]


def test_accepted_labels_stay_and_rejected_ones_are_corrected():
    backend = Scripted({"dog": 0.9, "cat": 0.2}, "It is a brown horse.")
    rows = verify_regions(views(["dog", "cat"]), backend, PROMPTS, VerifySettings())
    assert [(r["label"], r["original_label"], r["verdict"]) for r in rows] == [
        ("dog", "dog", "accurate"),
        ("brown horse", "cat", "corrected"),
    ]
    assert rows[0]["p_accurate"] == 0.9
    assert backend.generated == ["Not cat; what is it?"]  # only the rejected label is asked


def test_garbage_correction_is_unparsed_and_keeps_the_label():
    backend = Scripted({"cat": 0.1}, "%%% ## 12")
    (row,) = verify_regions(views(["cat"]), backend, PROMPTS, VerifySettings())
    assert (row["label"], row["verdict"]) == ("cat", "unparsed")
    assert row["verify_reason"] == "correction '%%% ## 12' is no label"


def test_a_model_answering_neither_yes_nor_no_is_unparsed():
    class Mute(Scripted):
        def choice_probabilities(self, images, prompts, choices):
            return [{"yes": 0.01, "no": 0.02}, {"yes": 0.0, "no": 0.0}]

    backend = Mute({}, "wolf")
    rows = verify_regions(views(["dog", "cat"]), backend, PROMPTS, VerifySettings())
    assert [(r["label"], r["verdict"]) for r in rows] == [("dog", "unparsed"), ("cat", "unparsed")]
    assert rows[0]["verify_reason"] == "no yes/no answer (P(yes) + P(no) = 0.03)"
    assert rows[0]["p_accurate"] == pytest.approx(1 / 3) and rows[1]["p_accurate"] is None
    assert backend.generated == []  # no correction is asked of a model that did not answer


def test_a_correction_naming_the_same_label_is_unparsed():
    backend = Scripted({"dog": 0.1}, "A dog.")
    (row,) = verify_regions(views(["dog"]), backend, PROMPTS, VerifySettings())
    assert (row["label"], row["verdict"]) == ("dog", "unparsed")
    assert row["verify_reason"] == "rejected, then named the same label"


def test_accept_threshold_is_a_setting():
    backend = Scripted({"dog": 0.6}, "wolf")
    (row,) = verify_regions(views(["dog"]), backend, PROMPTS, VerifySettings(accept=0.7))
    assert row["verdict"] == "corrected" and row["label"] == "wolf"


def test_parse_label():
    assert parse_label("A red car.", 4) == "red car"
    assert parse_label("this is the Teddy-bear", 4) == "teddy-bear"
    assert parse_label("a very long name of many many words", 4) is None
    assert parse_label("", 4) is None
    assert parse_label("car 42", 4) is None


def test_a_correction_cut_off_at_the_token_limit_is_no_label():
    backend = Scripted({"cat": 0.1}, Generation("a brown", "length"))
    (row,) = verify_regions(views(["cat"]), backend, PROMPTS, VerifySettings())
    assert (row["label"], row["verdict"]) == ("cat", "unparsed")
    assert row["verify_reason"] == "truncated: correction cut off at the token limit"
    assert json.loads(row["correct_generation"])["do_sample"] is False

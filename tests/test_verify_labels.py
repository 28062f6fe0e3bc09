import json
from functools import partial

import pytest
from PIL import Image

from conftest import region_shard
from hic.decoding import GREEDY, Generation
from hic.verify_labels import VerifySettings, parse_label, verify_batch, verify_shard

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
    rows = verify_batch(views(["dog", "cat"]), backend, PROMPTS, VerifySettings())
    assert [(r["label"], r["original_label"], r["verdict"]) for r in rows] == [
        ("dog", "dog", "accurate"),
        ("brown horse", "cat", "corrected"),
    ]
    assert rows[0]["p_accurate"] == 0.9
    assert backend.generated == ["Not cat; what is it?"]  # only the rejected label is asked


def test_garbage_correction_is_unparsed_and_keeps_the_label():
    backend = Scripted({"cat": 0.1}, "%%% ## 12")
    (row,) = verify_batch(views(["cat"]), backend, PROMPTS, VerifySettings())
    assert (row["label"], row["verdict"]) == ("cat", "unparsed")
    assert row["verify_reason"] == "correction '%%% ## 12' is no label"


def test_a_model_answering_neither_yes_nor_no_is_unparsed():
    class Mute(Scripted):
        def choice_probabilities(self, images, prompts, choices):
            return [{"yes": 0.01, "no": 0.02}, {"yes": 0.0, "no": 0.0}]

    backend = Mute({}, "wolf")
    rows = verify_batch(views(["dog", "cat"]), backend, PROMPTS, VerifySettings())
    assert [(r["label"], r["verdict"]) for r in rows] == [("dog", "unparsed"), ("cat", "unparsed")]
    assert rows[0]["verify_reason"] == "no yes/no answer (P(yes) + P(no) = 0.03)"
    assert rows[0]["p_accurate"] == pytest.approx(1 / 3) and rows[1]["p_accurate"] is None
    assert backend.generated == []  # no correction is asked of a model that did not answer


def test_a_correction_naming_the_same_label_is_unparsed():
    backend = Scripted({"dog": 0.1}, "A dog.")
    (row,) = verify_batch(views(["dog"]), backend, PROMPTS, VerifySettings())
    assert (row["label"], row["verdict"]) == ("dog", "unparsed")
    assert row["verify_reason"] == "rejected, then named the same label"


def test_accept_threshold_is_a_setting():
    backend = Scripted({"dog": 0.6}, "wolf")
    (row,) = verify_batch(views(["dog"]), backend, PROMPTS, VerifySettings(accept=0.7))
    assert row["verdict"] == "corrected" and row["label"] == "wolf"


def test_parse_label():
    assert parse_label("A red car.", 4) == "red car"
    assert parse_label("this is the Teddy-bear", 4) == "teddy-bear"
    assert parse_label("a very long name of many many words", 4) is None
    assert parse_label("", 4) is None
    assert parse_label("car 42", 4) is None


def test_a_correction_cut_off_at_the_token_limit_is_no_label():
    backend = Scripted({"cat": 0.1}, Generation("a brown", "length"))
    (row,) = verify_batch(views(["cat"]), backend, PROMPTS, VerifySettings())
    assert (row["label"], row["verdict"]) == ("cat", "unparsed")
    assert row["verify_reason"] == "truncated: correction cut off at the token limit"
    assert json.loads(row["correct_generation"])["do_sample"] is False


class Counting:
    """P(yes) from the label's number, "horse" as every correction; records the labels it is
    asked about, and dies (as if killed) at its ``die_at``-th question."""

    decoding = GREEDY

    def __init__(self, die_at: int | None = None):
        self.die_at, self.calls, self.asked = die_at, 0, []

    def choice_probabilities(self, images, prompts, choices):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        labels = [p.split()[1] for p in prompts]
        self.asked += labels
        return [{"yes": int(x[1:]) % 4 / 4, "no": 1 - int(x[1:]) % 4 / 4} for x in labels]

    def generate(self, images, prompts, max_new_tokens):
        return [Generation("horse", "stop")] * len(prompts)


# Regions by image, in tar order; the second image has none. Batches of 2: [r0 r1] [r2 r3]
# [r4 r5] [r6].
LABELS = [["r0", "r1", "r2"], [], ["r3"], ["r4", "r5"], ["r6"]]


def killed_shard(tmp_path):
    """A shard, its uninterrupted verification, and a run killed after two flushed batches."""
    regions, tar, status = region_shard(tmp_path, LABELS)
    verify = partial(
        verify_shard,
        regions,
        tar,
        status,
        settings=VerifySettings(batch_size=2),
        identity={"model": "scripted"},
        flush_every=1,
    )
    verify(out=tmp_path / "whole.parquet", prompts=PROMPTS, backend=Counting())
    with pytest.raises(KeyboardInterrupt):
        verify(out=tmp_path / "verified.parquet", prompts=PROMPTS, backend=Counting(die_at=3))
    return verify


def test_a_killed_verification_resumes_without_asking_about_a_region_twice(tmp_path):
    verify = killed_shard(tmp_path)
    backend = Counting()
    summary = verify(out=tmp_path / "verified.parquet", prompts=PROMPTS, backend=backend)
    assert backend.asked == ["r4", "r5", "r6"] and summary["resumed_regions"] == 4
    assert summary["verdict"] == {"accurate": 3, "corrected": 4, "unparsed": 0}
    whole = (tmp_path / "whole.parquet").read_bytes()
    assert (tmp_path / "verified.parquet").read_bytes() == whole
    assert not (tmp_path / "verified.parquet.parts").exists()


def test_verification_parts_of_another_prompt_are_discarded(tmp_path):
    verify = killed_shard(tmp_path)
    backend = Counting()
    prompts = {**PROMPTS, "verify": "Is {label} really in the {colour} box?"}
    summary = verify(out=tmp_path / "verified.parquet", prompts=prompts, backend=backend)
    assert backend.asked == [f"r{i}" for i in range(7)] and summary["resumed_regions"] == 0

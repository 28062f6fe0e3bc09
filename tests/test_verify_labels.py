import json
from functools import partial

import pytest
from PIL import Image

from conftest import region_shard
from hic.decoding import GREEDY, Generation
from hic.region_tables import read_rows
from hic.verify_labels import (
    VerifySettings,
    parse_label,
    planted_wrong_label,
    verify_batch,
    verify_shard,
)

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


# ------------------------------------------------------------------ planted wrong labels
VOCABULARY = {"things": ["dog", "cat", "wolf", "night heron"], "stuff": ["sky", "grass", "sea"]}


def region(i, label="dog", kind="foreground"):
    return {"key": f"{i // 3:016x}", "label": label, "kind": kind, "bbox": [i, 2.0, 10.0, 5.0]}


def test_planting_is_a_deterministic_share_of_other_labels_of_the_same_kind():
    regions = [region(i, "Dog") for i in range(2000)] + [
        region(i, "sky", "background") for i in range(2000)
    ]
    planted = [planted_wrong_label(r, 0.25, 7, VOCABULARY) for r in regions]
    assert planted == [planted_wrong_label(r, 0.25, 7, VOCABULARY) for r in regions]
    share = sum(p is not None for p in planted) / len(planted)
    assert 0.22 < share < 0.28
    foreground, background = set(planted[:2000]) - {None}, set(planted[2000:]) - {None}
    assert foreground == {"cat", "wolf", "night heron"}  # never the region's own ("Dog")
    assert background == {"grass", "sea"}
    other_seed = [planted_wrong_label(r, 0.25, 8, VOCABULARY) for r in regions]
    assert other_seed != planted


def test_planting_depends_on_the_region_not_on_the_vocabulary_order():
    shuffled = {k: list(reversed(v)) for k, v in VOCABULARY.items()}
    regions = [region(i) for i in range(200)]
    assert [planted_wrong_label(r, 0.5, 0, VOCABULARY) for r in regions] == [
        planted_wrong_label(r, 0.5, 0, shuffled) for r in regions
    ]


def test_no_planting_at_share_zero_and_a_clear_error_without_a_vocabulary():
    assert all(planted_wrong_label(region(i), 0.0, 0, None) is None for i in range(500))
    with pytest.raises(ValueError, match="plant_wrong is 1.0, but no vocabulary"):
        planted_wrong_label(region(0), 1.0, 0, None)
    with pytest.raises(ValueError, match="kind 'mask'"):
        planted_wrong_label(region(0, kind="mask"), 1.0, 0, VOCABULARY)
    with pytest.raises(ValueError, match="no stuff name other than 'sky'"):
        planted_wrong_label(region(0, "sky", "background"), 1.0, 0, {"stuff": ["Sky"]})


class Truthful:
    """Says yes to the true label only and names it when asked for a correction."""

    decoding = GREEDY

    def __init__(self, truth: str):
        self.truth, self.asked = truth, []

    def choice_probabilities(self, images, prompts, choices):
        labels = [p.removeprefix("Is ").split(" in the ")[0] for p in prompts]
        self.asked += labels
        return [
            {"yes": 0.9, "no": 0.1} if x == self.truth else {"yes": 0.1, "no": 0.9} for x in labels
        ]

    def generate(self, images, prompts, max_new_tokens):
        return [Generation(f"A {self.truth}.", "stop")] * len(prompts)


def region_views(n):
    return [(region(i), Image.new("RGB", (8, 8))) for i in range(n)]


def test_planted_labels_are_asked_about_rejected_and_corrected_back():
    backend = Truthful("dog")
    settings = VerifySettings(plant_wrong=0.5)
    rows = verify_batch(region_views(40), backend, PROMPTS, settings, VOCABULARY)
    planted = [r for r in rows if r["planted_label"] is not None]
    kept = [r for r in rows if r["planted_label"] is None]
    assert 10 < len(planted) < 30 and kept
    # the model saw the planted label, and corrected it back to the detector's
    assert backend.asked == [r["planted_label"] or "dog" for r in rows]
    for r in planted:
        assert r["planted_label"] != "dog" and r["original_label"] == "dog"
        assert (r["verdict"], r["label"]) == ("corrected", "dog")
        assert r["correct_generation"] is not None
    assert all(
        (r["verdict"], r["label"], r["original_label"]) == ("accurate",) + ("dog",) * 2
        for r in kept
    )


def test_an_accepted_planted_label_stays_the_label():
    (row,) = verify_batch(
        region_views(1),
        Scripted({"cat": 0.9}, "dog"),
        PROMPTS,
        VerifySettings(plant_wrong=1.0),
        {"things": ["cat", "dog"]},
    )
    assert (row["label"], row["planted_label"], row["original_label"]) == ("cat", "cat", "dog")
    assert row["verdict"] == "accurate"


def test_planting_does_not_depend_on_the_batch():
    settings = VerifySettings(plant_wrong=0.5)
    views_ = region_views(30)
    whole = verify_batch(views_, Truthful("dog"), PROMPTS, settings, VOCABULARY)
    split = [
        row
        for part in (views_[20:], views_[:7], views_[7:20])
        for row in verify_batch(part, Truthful("dog"), PROMPTS, settings, VOCABULARY)
    ]
    by_box = {tuple(r["bbox"]): r["planted_label"] for r in split}
    assert [r["planted_label"] for r in whole] == [by_box[tuple(r["bbox"])] for r in whole]


class RightAboutR:
    """The region shard's labels (r0, r1, ...) are right; anything else is "horse"."""

    decoding = GREEDY

    def choice_probabilities(self, images, prompts, choices):
        labels = [p.split()[1] for p in prompts]
        return [{"yes": 0.9 * x.startswith("r"), "no": 1 - 0.9 * x.startswith("r")} for x in labels]

    def generate(self, images, prompts, max_new_tokens):
        return [Generation("horse", "stop")] * len(prompts)


def test_a_shard_records_planted_labels_and_plants_none_by_default(tmp_path):
    regions, tar, status = region_shard(tmp_path, LABELS)
    verify = partial(
        verify_shard,
        regions,
        tar,
        status,
        prompts=PROMPTS,
        backend=RightAboutR(),
        identity={"model": "scripted"},
        vocabulary=VOCABULARY,
    )
    summary = verify(tmp_path / "plain.parquet", settings=VerifySettings())
    plain = read_rows(tmp_path / "plain.parquet")
    assert summary["planted"] == 0 and all(r["planted_label"] is None for r in plain)
    assert {r["verdict"] for r in plain} == {"accurate"}
    settings = VerifySettings(plant_wrong=0.5, plant_seed=3)
    summary = verify(tmp_path / "planted.parquet", settings=settings)
    rows = read_rows(tmp_path / "planted.parquet")
    expected = [planted_wrong_label(r, 0.5, 3, VOCABULARY) for r in plain]
    assert [r["planted_label"] for r in rows] == expected and summary["planted"] == sum(
        p is not None for p in expected
    ) > 0
    for r in rows:
        planted = r["planted_label"] is not None
        assert r["verdict"] == ("corrected" if planted else "accurate")
        assert r["label"] == ("horse" if planted else r["original_label"])


def test_a_killed_planted_verification_resumes_to_the_same_rows(tmp_path):
    regions, tar, status = region_shard(tmp_path, LABELS)
    verify = partial(
        verify_shard,
        regions,
        tar,
        status,
        prompts=PROMPTS,
        settings=VerifySettings(batch_size=2, plant_wrong=0.5),
        identity={"model": "scripted"},
        flush_every=1,
        vocabulary=VOCABULARY,
    )
    verify(out=tmp_path / "whole.parquet", backend=RightAboutR())

    class Dying(RightAboutR):
        calls = 0

        def choice_probabilities(self, images, prompts, choices):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().choice_probabilities(images, prompts, choices)

    with pytest.raises(KeyboardInterrupt):
        verify(out=tmp_path / "verified.parquet", backend=Dying())
    summary = verify(out=tmp_path / "verified.parquet", backend=RightAboutR())
    assert summary["resumed_regions"] == 4
    assert read_rows(tmp_path / "verified.parquet") == read_rows(tmp_path / "whole.parquet")


def test_verification_parts_of_another_plant_seed_are_discarded(tmp_path):
    verify = killed_shard(tmp_path)
    settings = VerifySettings(batch_size=2, plant_seed=1)
    summary = verify(
        out=tmp_path / "verified.parquet", prompts=PROMPTS, backend=Counting(), settings=settings
    )
    assert summary["resumed_regions"] == 0

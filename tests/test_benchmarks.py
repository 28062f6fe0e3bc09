"""Tests for the benchmark loaders (on tiny fixtures in each published layout) and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hic import demo_world as dw
from hic.benchmarks import (
    BenchmarkMissing,
    ClassificationSet,
    RetrievalSet,
    load_benchmark,
    load_dci,
    load_imagefolder,
    load_sharegpt4v,
    load_urban1k,
    recall_at_k,
    rejoin_sentences,
    topk_accuracy,
)


def image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


# ---------------------------------------------------------------- fixtures
def urban1k_folders(root: Path) -> Path:
    for stem, text in (
        ("2", "Second.\nnot this\n"),
        ("10", "  Tenth city street.  \n"),
        ("1", "One"),
    ):
        image(root / "image" / f"{stem}.jpg")
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{stem}.txt").write_text(text)
    return root


def urban1k_json(root: Path) -> Path:
    """FLAIR's layout: annotations/annotations.json and the images in images/."""
    records = [
        {"image_id": 7, "image": "b.jpg", "caption": "A bus. It is red."},
        {"image_id": 3, "image": "a.jpg", "caption": "A tram at dusk."},
    ]
    for r in records:
        image(root / "images" / r["image"])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "annotations.json").write_text(json.dumps({"annotations": records}))
    return root


def sharegpt4v(tmp: Path, n_records: int = 5, file_name: str = "share-captioner.json"):
    records = []
    for i in range(n_records):
        rel = f"sam/images/sa_{1000 + i}.jpg"
        image(tmp / "data" / rel)
        records.append(
            {
                "id": f"sa_{1000 + i}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the image in detail?"},
                    {"from": "gpt", "value": f"Caption number {i}.\n\nMore detail."},
                ],
            }
        )
    path = tmp / file_name
    path.write_text(json.dumps(records))
    return path, tmp / "data"


def dci(root: Path, records: dict[str, dict]) -> Path:
    """DCI's release: annotations/*.json, photos/, and splits.json naming the annotations."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for stem, record in records.items():
        image(root / "photos" / record["image"])
        extra = {"mask_data": {"0": {"label": "x"}}, "summaries": {}, "split": "train"}
        (root / "annotations" / f"{stem}.json").write_text(json.dumps(record | extra))
    names = [f"{stem}.json" for stem in records]
    splits = {"train": names[:-1], "valid": [], "test": names[-1:]}
    (root / "splits.json").write_text(json.dumps(splits))
    return root


DCI_RECORDS = {
    "z_ann": {"image": "sa_1.jpg", "short_caption": "A dog.", "extra_caption": "It sleeps."},
    "a_ann": {"image": "sa_3.jpg", "short_caption": "A cat", "extra_caption": ""},
    "m_ann": {"image": "sa_2.jpg", "short_caption": " A car. ", "extra_caption": " Blue roof.\n"},
}


# ---------------------------------------------------------------- loaders
def test_urban1k_folder_layout_pairs_stems_and_reads_first_line(tmp_path: Path) -> None:
    root = urban1k_folders(tmp_path / "Urban1k")
    s = load_urban1k(root)
    assert s.name == "urban1k"
    assert [p.name for p in s.images] == ["1.jpg", "10.jpg", "2.jpg"]
    assert s.captions == ["One", "Tenth city street.", "Second."]


def test_urban1k_in_flairs_layout_keeps_record_order(tmp_path: Path) -> None:
    root = urban1k_json(tmp_path / "u")
    s = load_urban1k(root, name="urban-json")
    assert s == RetrievalSet(
        "urban-json",
        [root / "images" / "b.jpg", root / "images" / "a.jpg"],
        ["A bus. It is red.", "A tram at dusk."],
    )


def test_urban1k_rejects_unpaired_and_unknown_layouts(tmp_path: Path) -> None:
    root = urban1k_folders(tmp_path / "u")
    image(root / "image" / "3.jpg")
    with pytest.raises(ValueError, match="1 images .* have no caption txt, first 3.jpg"):
        load_urban1k(root)
    (root / "image" / "3.jpg").unlink()
    (root / "image" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images missing, first .*2\.jpg"):
        load_urban1k(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not match the layout") as err:
        load_urban1k(tmp_path / "empty")
    assert not isinstance(err.value, BenchmarkMissing)


def test_sharegpt4v_takes_the_first_n_gpt_turns(tmp_path: Path) -> None:
    path, images = sharegpt4v(tmp_path)
    s = load_sharegpt4v(path, images, 3)
    assert s.images == [images / f"sam/images/sa_{1000 + i}.jpg" for i in range(3)]
    # sentences split at line breaks and full stops and rejoined, as FLAIR builds them
    assert s.captions == [f"Caption number {i}. More detail" for i in range(3)]
    with pytest.raises(ValueError, match="has 5 records, needs 6"):
        load_sharegpt4v(path, images, 6)


def test_sharegpt4v_reads_flairs_10k_file_for_both_sizes(tmp_path: Path) -> None:
    path, images = sharegpt4v(tmp_path, n_records=12, file_name="share4v_sam_10k.json")
    small, large = (load_sharegpt4v(path, images, n) for n in (3, 12))
    assert large.captions[:3] == small.captions and len(large.images) == 12


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A dog.\nIt sleeps.", "A dog. It sleeps"),
        ("One. Two.\n\nThree</s>Four", "One. Two. Three. Four"),
        ("  No stop  ", "No stop"),
    ],
)
def test_rejoin_sentences(text: str, expected: str) -> None:
    assert rejoin_sentences(text) == expected


def test_dci_joins_captions_over_every_split_in_splits_order(tmp_path: Path) -> None:
    root = dci(tmp_path / "dci", DCI_RECORDS)
    s = load_dci(root)
    assert [p.name for p in s.images] == ["sa_1.jpg", "sa_3.jpg", "sa_2.jpg"]
    assert all(p.parent == root / "photos" for p in s.images)
    assert s.captions == ["A dog. It sleeps", "A cat", "A car. Blue roof"]
    (root / "annotations" / "a_ann.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"splits\.json names .*a_ann\.json"):
        load_dci(root)


def test_dci_empty_caption_names_the_file(tmp_path: Path) -> None:
    empty = {"image": "sa_9.jpg", "short_caption": " ", "extra_caption": ""}
    root = dci(tmp_path / "dci", DCI_RECORDS | {"blank": empty})
    with pytest.raises(ValueError, match=r"blank\.json: empty caption"):
        load_dci(root)


def test_load_benchmark_dispatches_on_format(tmp_path: Path) -> None:
    path, images = sharegpt4v(tmp_path)
    specs = {
        "urban1k": {"format": "urban1k", "path": str(urban1k_json(tmp_path / "u"))},
        "sharegpt4v-1k": {"format": "sharegpt4v", "path": str(path), "images": images, "n": 2},
        "dci": {"format": "dci", "path": dci(tmp_path / "dci", DCI_RECORDS), "optional": True},
    }
    sizes = {name: len(load_benchmark(name, spec).images) for name, spec in specs.items()}
    assert sizes == {"urban1k": 2, "sharegpt4v-1k": 2, "dci": 3}
    assert load_benchmark("dci", specs["dci"]).name == "dci"
    with pytest.raises(ValueError, match="unknown format 'coco'"):
        load_benchmark("x", {"format": "coco", "path": tmp_path})


@pytest.mark.parametrize(
    ("spec", "layout"),
    [
        ({"format": "urban1k"}, "{p}/annotations/annotations.json with the images in {p}/images/"),
        ({"format": "sharegpt4v", "images": "imgs", "n": 1000}, "a ShareGPT4V JSON list"),
        ({"format": "dci"}, "{p}/splits.json naming the files of {p}/annotations/"),
    ],
)
def test_missing_benchmark_names_its_layout_or_is_skipped(
    tmp_path: Path, spec: dict, layout: str
) -> None:
    path = tmp_path / "absent"
    with pytest.raises(BenchmarkMissing) as err:
        load_benchmark("bench", spec | {"path": str(path)})
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "'bench'" in message and str(path) in message and layout.format(p=path) in message
    assert len(message.splitlines()) <= 2
    assert load_benchmark("bench", spec | {"path": str(path), "optional": True}) is None


def test_a_benchmark_of_the_wrong_size_is_named(tmp_path: Path) -> None:
    root = urban1k_folders(tmp_path / "u")
    n = len(load_benchmark("urban1k", {"format": "urban1k", "path": str(root)}).images)
    assert load_benchmark("urban1k", {"format": "urban1k", "path": str(root), "size": n})
    with pytest.raises(ValueError, match=f"{n} image-caption pairs, expected 1000"):
        load_benchmark("urban1k", {"format": "urban1k", "path": str(root), "size": 1000})


def test_optional_benchmark_with_missing_images_still_fails(tmp_path: Path) -> None:
    root = urban1k_json(tmp_path / "u")
    (root / "images" / "a.jpg").unlink()
    (root / "images" / "b.jpg").unlink()
    spec = {"format": "urban1k", "path": str(root), "optional": True}
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images missing, first .*b\.jpg") as err:
        load_benchmark("urban1k", spec)
    assert not isinstance(err.value, BenchmarkMissing)


def test_load_imagefolder(tmp_path: Path) -> None:
    for rel in ("traffic_light/b.png", "traffic_light/a.jpg", "cat/x.jpg", "dog/1.JPG"):
        image(tmp_path / "cls" / rel)
    (tmp_path / "cls" / "cat" / "notes.txt").write_text("not an image")
    s = load_imagefolder(tmp_path / "cls")
    assert s == ClassificationSet(
        "cls",
        [tmp_path / "cls" / r for r in ("cat/x.jpg", "dog/1.JPG", "traffic_light/a.jpg")]
        + [tmp_path / "cls" / "traffic_light/b.png"],
        [0, 1, 2, 2],
        ["cat", "dog", "traffic light"],
    )
    with pytest.raises(BenchmarkMissing, match="<class>"):
        load_imagefolder(tmp_path / "nope")


def test_imagefolder_class_names_from_a_file_or_imagenet(tmp_path: Path) -> None:
    for wnid in ("n01440764", "n01443537"):
        image(tmp_path / "val" / wnid / "x.JPEG")
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\n")
    assert load_imagefolder(tmp_path / "val", classnames=str(names)).classnames == [
        "tench",
        "goldfish",
    ]
    # ImageNet's 1,000 names need its 1,000 folders: a partial copy is named, not mislabelled.
    with pytest.raises(ValueError, match="2 class folders .* but 1000 class names"):
        load_imagefolder(tmp_path / "val", classnames="imagenet")


# ---------------------------------------------------------------- metrics
def test_identity_similarity_is_perfect_recall() -> None:
    assert recall_at_k(np.eye(12)) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_recall_follows_known_ranks() -> None:
    ranks, n = [0, 1, 3, 2], 4
    sim = np.zeros((n, n))
    for i, r in enumerate(ranks):
        order = [j for j in range(n) if j != i]
        order.insert(r, i)
        sim[i, order] = np.arange(n, 0, -1)  # the column at position p scores n - p
    assert recall_at_k(sim, ks=(1, 2, 3, 4, 9)) == {
        "R@1": 0.25,
        "R@2": 0.5,
        "R@3": 0.75,
        "R@4": 1.0,
        "R@9": 1.0,
    }


def test_constant_similarity_ranks_every_positive_last() -> None:
    assert recall_at_k(np.full((5, 5), 0.3), ks=(1, 4, 5)) == {"R@1": 0.0, "R@4": 0.0, "R@5": 1.0}


def test_tie_with_one_other_candidate_counts_against_the_positive() -> None:
    sim = np.array([[0.9, 0.9, 0.1], [0.0, 1.0, 0.5], [0.2, 0.3, 0.8]])
    assert recall_at_k(sim, ks=(1, 2)) == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}


def test_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        recall_at_k(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([[np.nan, 0.0], [0.0, 1.0]]))


def test_topk_accuracy_on_known_logits() -> None:
    logits = np.array(
        [
            [5.0, 1.0, 0.0, 0.0],  # label 0 first
            [2.0, 3.0, 1.0, 0.0],  # label 0 second
            [1.0, 1.0, 1.0, 1.0],  # label 2 tied with all: last
            [0.0, 4.0, 4.0, 1.0],  # label 1 tied with class 2: second
        ]
    )
    acc = topk_accuracy(logits, [0, 0, 2, 1], ks=(1, 2, 4))
    assert acc == {"top1": 0.25, "top2": 0.75, "top4": 1.0}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        topk_accuracy(logits, [0, 0, 4, 1])


def test_demo_world_benchmarks_load(tmp_path: Path) -> None:
    dw.write_world(
        tmp_path,
        n_images=1,
        n_benchmark_pairs=2,
        width=48,
        height=40,
        seed=0,
        url_key=lambda url: url,
        classify_per_class=1,
    )
    retrieval = load_benchmark("demo", {"format": "urban1k", "path": tmp_path / "benchmark"})
    assert len(retrieval.images) == 4 and all(len(c.split()) > 30 for c in retrieval.captions)
    classify = load_imagefolder(tmp_path / "classify")
    assert classify.classnames == sorted(dw.CLASSES) and classify.labels == list(
        range(len(dw.CLASSES))
    )

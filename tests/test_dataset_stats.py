import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.assemble import RELEASE_SCHEMA
from hic.dataset_stats import (
    dataset_stats,
    plot_dataset,
    region_recall,
    summary_dict,
    summary_markdown,
)
from hic.demo_world import REFERENCE_SCHEMA

QUANTILES = [0.0, 0.5, 1.0]


def reg(
    label, kind="foreground", words=3, label_source="accurate", caption_source="llm", bbox=None
):
    return {
        "label": label,
        "bbox": bbox or [0.0, 0.0, 10.0, 10.0],
        "caption": " ".join(["w"] * words) or None,
        "kind": kind,
        "score": 0.5,
        "label_source": label_source,
        "caption_source": caption_source,
    }


def row(key, regions, short_words, long_words, status="ok"):
    return {
        "key": key,
        "url": f"https://example.com/{key}.jpg",
        "width": 100,
        "height": 100,
        "regions": regions,
        "scene_status": status,
        "scene_model": "org/vlm",
        "scene_model_revision": None,
        "scene_prompt_hash": "feed",
        "region_provenance": json.dumps({"verify": {"prompt_hash": "ab"}}),
        "code_version": "v1",
        "short_words": short_words,
        "long_words": long_words,
        "region_count": len(regions),
        "region_words": [len(r["caption"].split()) if r["caption"] else 0 for r in regions],
    }


def write(path, rows, schema=RELEASE_SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def files(tmp_path):
    return [
        write(
            tmp_path / "00000.parquet",
            [
                row(
                    "a",
                    [
                        reg("dog", words=5),
                        reg("cat", words=7, label_source="corrected"),
                        reg("sky", "background", words=3, caption_source="fallback"),
                    ],
                    4,
                    20,
                ),
                row("b", [], 0, 0, status="unparsed"),
            ],
        ),
        write(
            tmp_path / "00001.parquet",
            [
                row(
                    "c",
                    [
                        reg("dog", words=6),
                        reg("grass", "background", 0, "unparsed", "failed"),
                    ],
                    6,
                    30,
                ),
                row("d", [reg("dog", words=4)], 5, 10),
            ],
        ),
        write(tmp_path / "00002.parquet", []),  # a shard whose images all failed to download
    ]


@pytest.fixture
def tables(files):
    return dataset_stats(files, quantiles=QUANTILES, top_labels=2)


def records(df):
    return df.to_dict("records")


def test_overview_and_regions_per_image(tables):
    assert records(tables["overview"]) == [
        {
            "images": 4,
            "regions": 6,
            "regions_per_image": 1.5,
            "images_without_regions": 1,
            "label_vocabulary": 4,
        }
    ]
    assert records(tables["regions_per_image_histogram"]) == [
        {"regions": n, "images": 1} for n in range(4)
    ]
    per_image = records(tables["regions_per_image"])[0]
    assert (per_image["images"], per_image["min"], per_image["max"]) == (4, 0, 3)
    assert (per_image["q0.5"], per_image["mean"]) == (1, 1.5)  # the lower middle value


def test_caption_words_per_kind_ignore_missing_captions(tables):
    words = {r["kind"]: r for r in records(tables["caption_words"])}
    assert list(words) == ["short", "long", "region"]
    assert {k: (v["n"], v["missing"], v["min"], v["max"], v["mean"]) for k, v in words.items()} == {
        "short": (3, 1, 4, 6, 5.0),
        "long": (3, 1, 10, 30, 20.0),
        "region": (5, 1, 3, 7, 5.0),
    }
    assert (words["long"]["q0"], words["long"]["q0.5"], words["long"]["q1"]) == (10, 20, 30)
    hist = tables["caption_words_histogram"]
    assert hist.loc[hist["kind"] == "region", "count"].sum() == 5


def test_labels_sources_kinds_and_status(tables):
    assert records(tables["labels"]) == [
        {"label": "dog", "count": 3, "images": 3},
        {"label": "cat", "count": 1, "images": 1},  # ties by name
    ]

    def counts(name, column):
        return dict(zip(tables[name][column], tables[name]["count"], strict=True))

    assert counts("label_sources", "label_source") == {
        "accurate": 4,
        "corrected": 1,
        "unparsed": 1,
    }
    assert counts("caption_sources", "caption_source") == {"llm": 4, "fallback": 1, "failed": 1}
    assert counts("region_kinds", "kind") == {"foreground": 4, "background": 2}
    assert counts("scene_status", "scene_status") == {"ok": 3, "unparsed": 1}
    assert tables["scene_status"]["fraction"].tolist() == [0.75, 0.25]


def test_summary_dict_is_json_and_markdown_and_plot(tables, tmp_path):
    summary = json.loads(json.dumps(summary_dict(tables)))
    assert summary["images"] == 4 and summary["regions"] == 6
    assert summary["label_vocabulary"] == 4
    assert summary["top_labels"] == {"dog": 3, "cat": 1}
    assert summary["label_sources"] == {"accurate": 4, "corrected": 1, "unparsed": 1}
    assert summary["caption_words"]["region"] == {"captions": 5, "missing": 1, "mean": 5.0}
    assert summary["provenance"] == [
        {
            "scene_model": "org/vlm",
            "scene_model_revision": None,
            "scene_prompt_hash": "feed",
            "regions": {"verify": {"prompt_hash": "ab"}},
            "code_version": "v1",
            "images": 4,
        }
    ]
    text = summary_markdown(tables)
    assert "Images: 4; regions: 6 (1.50 per image, 1 images without)" in text
    assert "## Label verification outcomes" in text
    plot_dataset(tables, tmp_path / "dataset.png")
    assert (tmp_path / "dataset.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def reference_row(key, regions):
    return {"key": key, "width": 100, "height": 100, "regions": regions, "source": "demo"}


# Image "a": 3 reference boxes; the release finds both objects (one exactly, one shifted with
# IoU 0.82) and puts its background box in the wrong place: 2 of 3 matched, 1 extra prediction.
REF_A = [
    reg("dog", bbox=[0.0, 0.0, 10.0, 10.0]),
    reg("cat", bbox=[50.0, 50.0, 10.0, 10.0]),
    reg("sky", "background", bbox=[0.0, 80.0, 100.0, 20.0]),
]
PRED_A = [
    reg("dog", bbox=[0.0, 0.0, 10.0, 10.0]),
    reg("cat", bbox=[51.0, 50.0, 10.0, 10.0]),
    reg("sky", "background", bbox=[0.0, 0.0, 100.0, 20.0]),
]


@pytest.fixture
def release(tmp_path):
    return [
        write(tmp_path / "r0.parquet", [row("a", PRED_A, 3, 10)]),
        # no reference for "x": ignored, its boxes count nowhere
        write(tmp_path / "r1.parquet", [row("x", [reg("dog")] * 2, 3, 10)]),
    ]


def by_scope(df):
    return {r["scope"]: r for r in records(df)}


def test_region_recall_on_one_image(release, tmp_path):
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A)], REFERENCE_SCHEMA)
    result = by_scope(region_recall(release, ref))
    assert (result["all"]["matched"], result["all"]["predicted"], result["all"]["reference"]) == (
        2,
        3,
        3,
    )
    assert result["all"]["recall"] == pytest.approx(2 / 3)
    assert result["all"]["precision"] == pytest.approx(2 / 3)
    assert (result["foreground"]["recall"], result["foreground"]["precision"]) == (1.0, 1.0)


def test_region_recall_counts_images_missing_from_release_as_missed(release, tmp_path):
    missing = reference_row("m", [reg("boat", bbox=[0.0, 0.0, 20.0, 20.0])])
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A), missing], REFERENCE_SCHEMA)
    result = by_scope(region_recall(release, ref))
    assert result["all"]["images"] == 2 and result["all"]["missing_images"] == 1
    assert result["all"]["recall"] == pytest.approx(2 / 4)
    assert result["all"]["precision"] == pytest.approx(2 / 3)
    assert result["foreground"]["recall"] == pytest.approx(2 / 3)
    assert result["foreground"]["precision"] == 1.0
    strict = by_scope(region_recall(release, ref, iou_threshold=0.9))
    assert strict["all"]["matched"] == 1  # the shifted box (IoU 0.82) no longer matches

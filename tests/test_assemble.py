import json

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hic.assemble import (
    RELEASE_SCHEMA,
    SUMMARY_SCHEMA,
    AssembleError,
    assemble_shard,
    dataset_card,
)
from hic.caption_scene import SCENE_SCHEMA
from hic.dataset_stats import dataset_stats, summary_dict
from hic.download import STATUS_SCHEMA
from hic.region_tables import PROPOSAL_SCHEMA

PROVENANCE = {"verify_labels": {"model": "tiny-llm", "prompt_hash": "abc123"}}
TINY = {"models": {"vlm": {"id": "resources/models/tiny-qwen2_5_vl", "revision": None}}}

REGION_COLUMNS = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.string()),
        ("bbox", pa.list_(pa.float64())),
        ("score", pa.float64()),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("mask_area", pa.float64()),
        ("query_source", pa.string()),
        ("rank", pa.int32()),
        ("original_label", pa.string()),
        ("verdict", pa.string()),
        ("p_accurate", pa.float64()),
        ("raw_caption", pa.string()),
        ("caption_status", pa.string()),
        ("caption_reason", pa.string()),
        ("caption", pa.string()),
        ("refine_path", pa.string()),
        ("refine_reason", pa.string()),
    ]
)


def write(path, schema, rows):
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    pq.write_table(pa.table(cols, schema=schema), path)
    return path


def downloaded(key, w, h):
    # Stored at half size: the release must report the original size.
    return {
        "key": key,
        "url": f"https://example.com/{key}.jpg",
        "caption": f"alt-text of {key}",
        "status": "success",
        "width": w // 2,
        "height": h // 2,
        "original_width": w,
        "original_height": h,
    }


def scene(key, short=None, long=None, status="ok"):
    return {
        "key": key,
        "short_caption": short,
        "long_caption": long,
        "status": status,
        "model_id": "org/vlm",
        "model_revision": "rev1",
        "prompt_hash": "feed",
    }


def region(key, label, kind, rank, caption, verdict="accurate", path="llm", bbox=(1, 2, 3, 4)):
    return {
        "key": key,
        "label": label,
        "bbox": [float(v) for v in bbox],
        "score": 0.5 + rank / 10,
        "kind": kind,
        "source": "detector",
        "rank": rank,
        "original_label": label,
        "verdict": verdict,
        "caption": caption,
        "refine_path": path,
    }


STATUS = [
    downloaded("d", 800, 600),
    downloaded("a", 640, 480),
    {"key": "b", "url": "https://example.com/b.jpg", "status": "failed_to_download"},
    downloaded("c", 100, 200),
]
SCENES = [
    scene("a", "a dog on grass", "a brown dog lies on green grass under a blue sky"),
    scene("b", status="failed"),
    scene("c", status="unparsed"),
    scene("d", "a red car", "a red car parked on a road"),
]
REGIONS = [
    region("a", "sky", "background", 2, "clear blue sky", bbox=(0, 0, 640, 100)),
    region("d", "car", "foreground", 0, None, verdict="corrected", path="failed"),
    region("a", "grass", "foreground", 1, "short green grass", path="fallback"),
    region("a", "dog", "foreground", 0, "a brown dog lying down", bbox=(10, 20, 30, 40)),
]


@pytest.fixture
def inputs(tmp_path):
    return {
        "status": write(tmp_path / "status.parquet", STATUS_SCHEMA, STATUS),
        "scene": write(tmp_path / "scene.parquet", SCENE_SCHEMA, SCENES),
        "regions": write(tmp_path / "regions.parquet", REGION_COLUMNS, REGIONS),
        "proposals": proposals(tmp_path / "proposals.parquet", ["a", "a", "d", "a"]),
    }


def proposals(path, keys):
    rows = [{"key": k, "label": "x", "bbox": [0.0, 0.0, 1.0, 1.0]} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows, schema=PROPOSAL_SCHEMA), path)
    return path


def run(inputs, out):
    return assemble_shard(
        inputs["status"],
        inputs["scene"],
        inputs["proposals"],
        inputs["regions"],
        out,
        out.parent.parent / "summary" / out.name,
        region_provenance=PROVENANCE,
        code_version="v1-3-gabc",
    )


@pytest.fixture
def release(inputs, tmp_path):
    out = tmp_path / "release" / "00000.parquet"
    summary = run(inputs, out)
    return out, summary


def test_one_row_per_downloaded_image_in_status_order(release):
    out, summary = release
    table = pq.read_table(out)
    # Round-trip the schema too: parquet renames list items to "element".
    pq.write_table(RELEASE_SCHEMA.empty_table(), out.parent / "empty.parquet")
    assert table.schema.equals(pq.read_schema(out.parent / "empty.parquet"), check_metadata=True)
    assert table["key"].to_pylist() == ["d", "a", "c"]  # b failed to download
    assert table["width"].to_pylist() == [800, 640, 100]  # original, not stored size
    assert table["height"].to_pylist() == [600, 480, 200]
    # the paper releases "original URLs, text captions and image size information"
    assert table["url"].to_pylist() == [f"https://example.com/{k}.jpg" for k in "dac"]
    assert table["alt_text"].to_pylist() == ["alt-text of d", "alt-text of a", "alt-text of c"]
    assert summary == {
        "images": 3,
        "regions": 4,
        "images_without_regions": 1,
        "regions_notes": {"no proposal": 1},
        "scene_status": {"ok": 2, "unparsed": 1},
    }


def test_an_image_without_regions_says_why(inputs, release, tmp_path):
    rows = {r["key"]: r for r in pq.read_table(release[0]).to_pylist()}
    assert {k: rows[k]["regions_note"] for k in "dac"} == {"d": None, "a": None, "c": "no proposal"}
    # Proposed, then every proposal filtered out by select_regions.
    inputs["proposals"] = proposals(tmp_path / "p2.parquet", ["a", "c", "d"])
    out = tmp_path / "again" / "00000.parquet"
    assert run(inputs, out)["regions_notes"] == {"none selected": 1}
    assert pq.read_table(out)["regions_note"].to_pylist() == [None, None, "none selected"]


def test_regions_ordered_foreground_first_then_rank(release):
    rows = {r["key"]: r for r in pq.read_table(release[0]).to_pylist()}
    assert [r["label"] for r in rows["a"]["regions"]] == ["dog", "grass", "sky"]
    assert rows["a"]["regions"][0] == {
        "label": "dog",
        "bbox": [10.0, 20.0, 30.0, 40.0],
        "caption": "a brown dog lying down",
        "kind": "foreground",
        "score": 0.5,
        "label_source": "accurate",
        "caption_source": "llm",
    }
    assert rows["a"]["regions"][1]["caption_source"] == "fallback"
    assert rows["d"]["regions"][0]["caption"] is None
    assert rows["d"]["regions"][0]["label_source"] == "corrected"
    assert rows["c"]["regions"] == []
    assert [rows[k]["region_count"] for k in "dac"] == [1, 3, 0]


def test_word_counts_and_provenance(release):
    rows = {r["key"]: r for r in pq.read_table(release[0]).to_pylist()}
    assert (rows["a"]["short_words"], rows["a"]["long_words"]) == (4, 11)
    assert rows["a"]["region_words"] == [5, 3, 3]
    assert rows["d"]["region_words"] == [0]  # null caption
    assert (rows["c"]["short_words"], rows["c"]["long_words"], rows["c"]["region_words"]) == (
        0,
        0,
        [],
    )
    assert rows["c"]["scene_status"] == "unparsed"
    assert (rows["a"]["scene_model"], rows["a"]["scene_model_revision"]) == ("org/vlm", "rev1")
    assert rows["a"]["scene_prompt_hash"] == "feed"
    assert json.loads(rows["c"]["region_provenance"]) == PROVENANCE
    assert rows["c"]["code_version"] == "v1-3-gabc"


def summary_rows(release_file):
    table = pq.read_table(release_file.parent.parent / "summary" / release_file.name)
    assert table.schema.equals(SUMMARY_SCHEMA, check_metadata=True)
    return [tuple(r.values()) for r in table.to_pylist()]


def test_summary_holds_exact_histograms_and_counts(release):
    provenance = {
        "scene_model": "org/vlm",
        "scene_model_revision": "rev1",
        "scene_prompt_hash": "feed",
        "region_provenance": json.dumps(PROVENANCE, sort_keys=True),
        "code_version": "v1-3-gabc",
    }
    rows = summary_rows(release[0])
    key = next(r[1] for r in rows if r[0] == "provenance")
    assert json.loads(key) == provenance
    assert rows == [
        ("caption_source", "failed", None, 1, None),
        ("caption_source", "fallback", None, 1, None),
        ("caption_source", "llm", None, 2, None),
        # c has no captions (0 words); a region caption of d is null
        ("caption_words", "long", 0, 1, None),
        ("caption_words", "long", 7, 1, None),
        ("caption_words", "long", 11, 1, None),
        ("caption_words", "region", 0, 1, None),
        ("caption_words", "region", 3, 2, None),
        ("caption_words", "region", 5, 1, None),
        ("caption_words", "short", 0, 1, None),
        ("caption_words", "short", 3, 1, None),
        ("caption_words", "short", 4, 1, None),
        *[("label", label, None, 1, 1) for label in ("car", "dog", "grass", "sky")],
        ("label_source", "accurate", None, 3, None),
        ("label_source", "corrected", None, 1, None),
        ("provenance", key, None, 3, None),
        ("region_kind", "background", None, 1, None),
        ("region_kind", "foreground", None, 3, None),
        ("regions_note", "no proposal", None, 1, None),
        *[("regions_per_image", None, n, 1, None) for n in (0, 1, 3)],
        ("scene_status", "ok", None, 2, None),
        ("scene_status", "unparsed", None, 1, None),
    ]


def test_missing_scene_key_is_an_error(inputs, tmp_path):
    write(inputs["scene"], SCENE_SCHEMA, [s for s in SCENES if s["key"] != "c"])
    with pytest.raises(AssembleError, match=r"scene\.parquet lacks downloaded 1 key\(s\): c"):
        run(inputs, tmp_path / "out.parquet")


def test_region_of_undownloaded_image_is_an_error(inputs, tmp_path):
    stray = [region("b", "cat", "foreground", 0, "a cat"), region("zz", "x", "foreground", 0, "")]
    write(inputs["regions"], REGION_COLUMNS, REGIONS + stray)
    with pytest.raises(AssembleError, match=r"regions\.parquet .* did not download: 2 key"):
        run(inputs, tmp_path / "out.parquet")


def test_unknown_region_kind_is_an_error(inputs, tmp_path):
    write(inputs["regions"], REGION_COLUMNS, [region("a", "sky", "backdrop", 0, "sky")])
    with pytest.raises(AssembleError, match=r"unknown region kind\(s\) \['backdrop'\]"):
        run(inputs, tmp_path / "out.parquet")


def test_shard_where_nothing_downloaded(inputs, tmp_path):
    write(inputs["status"], STATUS_SCHEMA, [STATUS[2]])
    write(inputs["regions"], REGION_COLUMNS, [])
    out = tmp_path / "release" / "out.parquet"
    assert run(inputs, out) == {
        "images": 0,
        "regions": 0,
        "images_without_regions": 0,
        "regions_notes": {},
        "scene_status": {},
    }
    assert pq.read_table(out).num_rows == 0
    assert summary_rows(out) == []


def test_shard_without_any_region(inputs, tmp_path):
    write(inputs["regions"], REGION_COLUMNS, [])
    out = tmp_path / "out.parquet"
    assert run(inputs, out)["regions"] == 0
    assert pq.read_table(out)["regions"].to_pylist() == [[], [], []]


def test_release_reads_back_in_pandas_duckdb_and_datasets(release, tmp_path, monkeypatch):
    out = release[0]
    expected = pq.read_table(out).to_pylist()

    df = pd.read_parquet(out)
    assert df["key"].tolist() == ["d", "a", "c"]
    assert [r["label"] for r in df.loc[1, "regions"]] == ["dog", "grass", "sky"]

    con = duckdb.connect()
    assert con.execute(
        "SELECT count(*), sum(region_count) FROM read_parquet(?)", [str(out)]
    ).fetchone() == (3, 4)
    labels = con.execute(
        "SELECT r.label, r.kind FROM read_parquet(?), unnest(regions) AS u(r) ORDER BY 1",
        [str(out)],
    ).fetchall()
    assert labels == [
        ("car", "foreground"),
        ("dog", "foreground"),
        ("grass", "foreground"),
        ("sky", "background"),
    ]
    con.close()

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 3
    assert list(ds) == expected


SUMMARY = {
    "images": 12345,
    "regions": 40000,
    "regions_per_image": 3.24,
    "images_without_regions": 17,
    "label_vocabulary": 812,
    "top_labels": {"person": 5000, "tree": 3000},
    "region_kinds": {"foreground": 30000, "background": 10000},
    "label_sources": {"accurate": 31000, "corrected": 8000, "unparsed": 1000},
    "caption_sources": {"llm": 39000, "fallback": 900, "failed": 100},
    "scene_status": {"ok": 12000, "unparsed": 345},
    "caption_words": {"short": {"captions": 12000, "missing": 345, "mean": 11.5}},
    "provenance": [
        {
            "scene_model": "Qwen/Qwen2.5-VL-7B-Instruct",
            "scene_model_revision": "cc594898",
            "scene_prompt_hash": "242f25ffb505c626",
            "regions": {"verify_labels": {"model": "Qwen/Qwen2.5-7B", "prompt_hash": "9f9f"}},
            "code_version": "v1.0",
            "images": 12345,
        }
    ],
}
PAPER = {"models": {"vlm": {"id": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "cc594898"}}}


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dataset_card_front_matter_counts_and_models():
    card = dataset_card(SUMMARY, PAPER)
    meta = front_matter(card)
    assert meta["configs"] == [{"config_name": "default", "data_files": "*.parquet"}]
    assert meta["size_categories"] == ["10K<n<100K"]
    assert "the captions were generated by the models listed" in card
    for text in [
        "Images: 12345",
        "Regions: 40000 (3.24 per image; 17 images without regions)",
        "812 distinct labels",
        "accurate: 31000 (77.5%), corrected: 8000 (20.0%), unparsed: 1000 (2.5%)",
        "llm: 39000 (97.5%), fallback: 900 (2.2%), failed: 100 (0.2%)",
        "ok: 12000 (97.2%), unparsed: 345 (2.8%)",
        "| vlm | `Qwen/Qwen2.5-VL-7B-Instruct` | cc594898 |",
        "`242f25ffb505c626`",
        '"prompt_hash": "9f9f"',
        'load_dataset("parquet"',
    ]:
        assert text in card, text
    for name in RELEASE_SCHEMA.names + ["regions[].label_source"]:
        assert f"`{name}`" in card, name
    assert "Noise, not captions" not in card
    assert "Measured against the reference" not in card  # no reference annotations


AGAINST_REFERENCE = {
    "iou_threshold": 0.5,
    "images": 11,
    "missing_images": 1,
    "regions": {
        "all": {
            "reference": 40,
            "predicted": 30,
            "recall": 0.5,
            "precision": 0.6667,
            "label_accuracy": 0.25,
        },
        "foreground": {
            "reference": 18,
            "predicted": 30,
            "recall": 1.0,
            "precision": 0.6,
            "label_accuracy": 0.25,
        },
        "background": {
            "reference": 22,
            "predicted": 0,
            "recall": 0.0,
            "precision": None,
            "label_accuracy": None,
        },
    },
    "scene_captions": {
        "ok_share": 0.9,
        "name_share": 0.8125,
        "colour_share": 0.4,
        "name_share_reference": 0.7,
        "colour_share_reference": 0.7,
    },
    "verification": {
        "planted": 8,
        "planted_rejected_share": 0.75,
        "planted_restored_share": 0.5,
        "planted_unparsed_share": 0.25,
        "planted_accepted_share": 0.125,
        "unplanted_right": 12,
        "unplanted_right_accepted_share": 0.9167,
    },
}


def test_dataset_card_gives_the_figures_against_the_reference():
    # as dataset_stats writes it: keys sorted
    figures = json.loads(json.dumps(AGAINST_REFERENCE, sort_keys=True))
    card = dataset_card(SUMMARY | {"against_reference": figures}, PAPER)
    section = card.split("## Measured against the reference annotations\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    for text in [
        "On 11 images with reference annotations (1 missing from this release)",
        "IoU >= 0.5",
        "| all | 40 | 30 | 0.500 | 0.667 | 0.250 |",
        "| background | 22 | 0 | 0.000 | n/a | n/a |",
        "0.900 of the images have an ok one",
        "0.812 of the reference's objects are named and 0.400 have their colour named",
        "(the reference's own short captions: 0.700 and 0.700)",
        "of 8 regions shown a deliberately wrong label, 0.750 were rejected, 0.500 corrected "
        "back to their own label, 0.250 unparsed and 0.125 accepted; of the 12 regions whose "
        "label is the reference's, 0.917 were accepted.",
    ]:
        assert text in section, text
    # in the table's order, whatever the JSON's key order
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
    assert rows[2:] == ["| all", "| foreground", "| background"]


def test_dataset_card_says_when_no_wrong_labels_were_planted():
    figures = AGAINST_REFERENCE | {
        "verification": AGAINST_REFERENCE["verification"] | {"planted": 0}
    }
    card = dataset_card(SUMMARY | {"against_reference": figures}, PAPER)
    assert "Label verification (no wrong labels were planted): of the 12 regions" in card
    assert "deliberately wrong" not in card


def test_dataset_card_gives_the_papers_terms():
    card = dataset_card(SUMMARY, PAPER)
    assert front_matter(card)["license"] == "cc-by-4.0"
    terms = card.split("## License\n", 1)[1].split("\n## ", 1)[0]
    for text in ["CC BY 4.0", "academic research only", "not redistributed", "alt-text"]:
        assert text in terms, text


def test_dataset_card_flags_tiny_models_of_the_default(release):
    summaries = [release[0].parent.parent / "summary" / release[0].name]
    summary = summary_dict(dataset_stats(summaries, quantiles=[0.5], top_labels=3))
    card = dataset_card(summary, TINY)
    assert "Noise, not captions" in card
    assert "Images: 3" in card and "Regions: 4 (1.33 per image" in card
    assert front_matter(card)["size_categories"] == ["n<1K"]

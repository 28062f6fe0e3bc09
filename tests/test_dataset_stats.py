import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.assemble import RELEASE_SCHEMA, release_summary
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


def summarise(files):
    """What the assemble stage writes next to each release shard."""
    out = [f.with_name(f"summary_{f.name}") for f in files]
    for f, summary in zip(files, out, strict=True):
        pq.write_table(release_summary(pq.read_table(f)), summary)
    return out


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
    return dataset_stats(summarise(files), quantiles=QUANTILES, top_labels=2)


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


def test_no_predictions_give_no_precision_and_valid_json(tables, tmp_path):
    empty = [write(tmp_path / "r.parquet", [row("a", [], 3, 10)])]
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A)], REFERENCE_SCHEMA)
    summary = summary_dict({**tables, "region_recall": region_recall(empty, ref)})
    assert summary["region_recall"]["all"] == {"recall": 0.0, "precision": None}
    json.dumps(summary, allow_nan=False)  # NaN is not JSON


# ------------------------------------------- merged summaries vs one query over every row
def row_level_stats(files, quantiles, top_labels):
    """The same tables computed over the release rows themselves: the reference."""
    q = ", ".join(f'quantile_disc({{c}}, {v}) FILTER ({{w}}) AS "q{v:g}"' for v in quantiles)
    con = duckdb.connect()
    con.read_parquet([str(f) for f in files]).create_view("release")
    con.execute(
        "CREATE VIEW words AS SELECT 'short' AS kind, short_words AS words FROM release "
        "UNION ALL SELECT 'long', long_words FROM release "
        "UNION ALL SELECT 'region', unnest(region_words) FROM release"
    )
    con.execute(
        "CREATE VIEW region_rows AS SELECT key, r.label AS label, r.kind AS kind, "
        "r.label_source AS label_source, r.caption_source AS caption_source "
        "FROM (SELECT key, unnest(regions) AS r FROM release)"
    )

    def counts(column, source):
        return con.execute(
            f"SELECT {column}, count(*) AS count, round(count(*) / sum(count(*)) OVER (), 4) "
            f"AS fraction FROM {source} GROUP BY 1 ORDER BY count DESC, 1"
        ).df()

    tables = {
        "overview": con.execute(
            "SELECT count(*) AS images, coalesce(sum(region_count), 0)::BIGINT AS regions, "
            "round(coalesce(avg(region_count), 0), 3) AS regions_per_image, "
            "count(*) FILTER (region_count = 0) AS images_without_regions, "
            "(SELECT count(DISTINCT label) FROM region_rows) AS label_vocabulary FROM release"
        ).df(),
        "regions_per_image": con.execute(
            "SELECT count(*) AS images, min(region_count) AS min, "
            f"{q.format(c='region_count', w='true')}, max(region_count) AS max, "
            "round(avg(region_count), 2) AS mean FROM release"
        ).df(),
        "regions_per_image_histogram": con.execute(
            "SELECT region_count AS regions, count(*) AS images FROM release GROUP BY 1 ORDER BY 1"
        ).df(),
        "caption_words": con.execute(
            "SELECT kind, count(*) FILTER (words > 0) AS n, "
            "count(*) FILTER (words = 0) AS missing, min(words) FILTER (words > 0) AS min, "
            f"{q.format(c='words', w='words > 0')}, max(words) FILTER (words > 0) AS max, "
            "round(avg(words) FILTER (words > 0), 2) AS mean FROM words GROUP BY kind "
            "ORDER BY list_position(['short', 'long', 'region'], kind)"
        ).df(),
        "caption_words_histogram": con.execute(
            "SELECT kind, words, count(*) AS count FROM words WHERE words > 0 "
            "GROUP BY 1, 2 ORDER BY 1, 2"
        ).df(),
        "labels": con.execute(
            "SELECT label, count(*) AS count, count(DISTINCT key) AS images FROM region_rows "
            "GROUP BY label ORDER BY count DESC, label LIMIT ?",
            [top_labels],
        ).df(),
        "region_kinds": counts("kind", "region_rows"),
        "label_sources": counts("label_source", "region_rows"),
        "caption_sources": counts("caption_source", "region_rows"),
        "scene_status": counts("scene_status", "release"),
        "regions_notes": counts(
            "regions_note", "(SELECT * FROM release WHERE regions_note IS NOT NULL)"
        ),
        "provenance": con.execute(
            "SELECT scene_model, scene_model_revision, scene_prompt_hash, region_provenance, "
            "code_version, count(*) AS images FROM release GROUP BY ALL ORDER BY images DESC"
        ).df(),
    }
    con.close()
    return tables


def pick(rng, values, n, p=None):
    """``n`` draws of ``values`` (None allowed), as a list."""
    return [values[i] for i in rng.choice(len(values), n, p=p)]


def generated_release(rng, n_images, max_regions):
    """Release rows with skewed, tie-rich distributions, nulls and three provenance groups."""
    labels = pick(rng, ["dog", "sky", "car", "tree", "road", None], 6 * n_images)
    region_counts = rng.integers(0, max_regions + 1, n_images)
    rows = []
    for i, n_regions in enumerate(region_counts):
        regions = [
            reg(
                labels[6 * i + j],
                kind=str(rng.choice(["foreground", "background"])),
                words=int(rng.choice([0, 3, 3, 40, 41, 60])),
                label_source=pick(rng, ["accurate", "corrected", "unparsed", None], 1)[0],
                caption_source=str(rng.choice(["llm", "fallback", "failed"])),
            )
            for j in range(n_regions)
        ]
        missing = rng.random() < 0.1
        r = row(
            f"{i:06x}",
            regions,
            0 if missing else int(rng.integers(1, 30)),
            0 if missing else int(rng.geometric(0.02)),
            status="unparsed" if missing else "ok",
        )
        # provenance groups of 60%, 30% and 10% of the rows: distinct counts, so a fixed order
        group = 0 if i % 10 < 6 else 1 if i % 10 < 9 else 2
        r["code_version"] = f"v{group}"
        if not regions:
            r["regions_note"] = str(rng.choice(["no proposal", "none selected"]))
        r["scene_model_revision"] = None if group == 1 else "rev"
        rows.append(r)
    return rows


@pytest.mark.parametrize(
    ("n_images", "max_regions", "n_shards"),
    [(3000, 6, 7), (400, 0, 3), (0, 3, 2), (1, 1, 1)],
)
def test_merged_summaries_give_the_figures_of_a_query_over_every_row(
    tmp_path, n_images, max_regions, n_shards
):
    rng = np.random.default_rng(n_images)
    rows = generated_release(rng, n_images, max_regions)
    cuts = np.sort(rng.integers(0, n_images + 1, n_shards - 1))  # shards of uneven size
    files = [
        write(tmp_path / f"{s:05d}.parquet", part.tolist())
        for s, part in enumerate(np.split(np.array(rows, dtype=object), cuts))
    ]
    quantiles = [0.0, 0.05, 0.07, 0.25, 0.29, 1 / 3, 0.5, 0.75, 0.95, 0.99, 1.0]
    merged = dataset_stats(summarise(files), quantiles=quantiles, top_labels=4)
    expected = row_level_stats(files, quantiles, top_labels=4)
    assert list(merged) == list(expected)
    for name, table in expected.items():
        pd.testing.assert_frame_equal(merged[name], table, check_exact=True, obj=name)
    assert summary_markdown(merged) == summary_markdown(expected)
    assert summary_dict(merged) == summary_dict(expected)

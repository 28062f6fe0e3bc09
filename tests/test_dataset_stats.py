import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.assemble import RELEASE_SCHEMA, dataset_card, release_summary
from hic.dataset_stats import (
    against_reference,
    dataset_stats,
    mentions,
    object_colour,
    plot_dataset,
    scene_caption_scores,
    score_regions,
    score_verification,
    stage_outcomes,
    summary_dict,
    summary_markdown,
)
from hic.demo_world import REFERENCE_SCHEMA
from hic.region_tables import VERIFIED_SCHEMA, write_rows

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
                {**row("b", [], 0, 0, status="unparsed"), "regions_note": "no proposal"},
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
    assert "## Outcomes per stage" in text
    assert "Against the reference" not in text  # no reference annotations given
    assert summary["against_reference"] is None
    plot_dataset(tables, tmp_path / "dataset.png")
    assert (tmp_path / "dataset.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_outcomes_count_and_share_each_status_column(tables):
    outcomes = stage_outcomes(tables)
    got = {(r["stage"], r["outcome"]): (r["count"], r["share"]) for r in records(outcomes)}
    assert got == {
        ("caption_scene", "ok"): (3, 0.75),
        ("caption_scene", "unparsed"): (1, 0.25),
        ("propose_select_regions", "has regions"): (3, 0.75),
        ("propose_select_regions", "no proposal"): (1, 0.25),
        ("verify_labels", "accurate"): (4, 0.6667),
        ("verify_labels", "corrected"): (1, 0.1667),
        ("verify_labels", "unparsed"): (1, 0.1667),
        ("refine_regions", "llm"): (4, 0.6667),
        ("refine_regions", "failed"): (1, 0.1667),
        ("refine_regions", "fallback"): (1, 0.1667),
    }
    assert set(zip(outcomes["stage"], outcomes["unit"], strict=True)) == {
        ("caption_scene", "images"),
        ("propose_select_regions", "images"),
        ("verify_labels", "regions"),
        ("refine_regions", "regions"),
    }
    status = json.loads(json.dumps(summary_dict(tables)))["stage_status"]
    assert status["verify_labels"]["rows"] == 6
    assert status["verify_labels"]["counts"] == {"accurate": 4, "corrected": 1, "unparsed": 1}
    assert status["caption_scene"]["shares"] == {"ok": 0.75, "unparsed": 0.25}
    assert status["refine_regions"]["column"] == "regions[].caption_source"


# ------------------------------------------------------------ against reference annotations
def box(x, y, w=10.0, h=10.0):
    return [float(x), float(y), float(w), float(h)]


def test_score_regions_recall_precision_and_label_accuracy_per_scope():
    truth = [
        reg("dog", bbox=box(0, 0)),
        reg("cat", bbox=box(50, 50)),
        reg("sky", "background", bbox=box(0, 0, 100, 40)),
        reg("grass", "background", bbox=box(0, 60, 100, 40)),
    ]
    predicted = [
        reg(" Dog ", bbox=box(0, 0)),  # matched, label right after normalisation
        reg("wolf", bbox=box(51, 50)),  # matched the cat (IoU 0.82), label wrong
        reg("tree", bbox=box(80, 0)),  # no box there: a false positive
        reg("SKY", "background", bbox=box(0, 0, 100, 40)),  # matched, right
        # a foreground box on the grass band: matches it only when kinds are pooled
        reg("field", bbox=box(0, 60, 100, 40)),
    ]
    result = by_scope(score_regions([(predicted, truth)]))
    fg, bg, pooled = result["foreground"], result["background"], result["all"]
    assert (fg["reference"], fg["predicted"], fg["matched"]) == (2, 4, 2)
    assert (fg["recall"], fg["precision"]) == (1.0, 0.5)
    assert (fg["labels_correct"], fg["label_accuracy"]) == (1, 0.5)
    assert (bg["reference"], bg["predicted"], bg["matched"]) == (2, 1, 1)
    assert (bg["recall"], bg["precision"], bg["label_accuracy"]) == (0.5, 1.0, 1.0)
    assert (pooled["reference"], pooled["predicted"], pooled["matched"]) == (4, 5, 4)
    assert (pooled["recall"], pooled["precision"]) == (1.0, 0.8)
    assert (pooled["labels_correct"], pooled["label_accuracy"]) == (2, 0.5)  # field != grass


def test_score_regions_counts_a_missing_image_as_missed_and_empty_ratios_as_none():
    truth = [reg("dog", bbox=box(0, 0))]
    result = by_scope(score_regions([(None, truth), ([], [])]))
    assert result["all"]["images"] == 2 and result["all"]["missing_images"] == 1
    assert (result["all"]["recall"], result["all"]["precision"]) == (0.0, None)
    assert pd.isna(result["all"]["label_accuracy"])  # nothing matched
    assert pd.isna(result["background"]["recall"])  # no background reference at all


def test_mentions_matches_whole_words_and_plurals():
    text = "Purple cup, two brown Umbrellas and three boxes near ice creams."
    assert mentions(text, "cup") and mentions(text, "umbrella") and mentions(text, "box")
    assert mentions(text, "purple") and mentions(text, "brown")
    assert mentions(text, "ice cream") and mentions(text, "Ice  Cream")
    assert mentions("two butterflies", "butterfly")
    assert not mentions("a cupboard", "cup")  # not inside a longer word
    assert not mentions(text, "cream ice")  # words in order
    assert not mentions(text, "red")
    assert not mentions(text, "")


def test_object_colour_is_the_first_colour_word_of_the_region_caption():
    colours = {"red", "blue", "white"}
    caption = "A small red ball, round, in the center, set against the blue sky."
    assert object_colour(caption, colours) == "red"
    assert object_colour("A large White kite.", colours) == "white"
    assert object_colour("A small ball.", colours) is None
    assert object_colour(None, colours) is None


COLOURS = {"red", "green", "blue", "yellow"}


def obj(label, colour, bbox=None):
    return reg(label, bbox=bbox) | {"caption": f"A small {colour} {label}, round, in the center."}


def reference_row(key, regions, short="Red ball on grass."):
    return {
        "key": key,
        "width": 100,
        "height": 100,
        "short_caption": short,
        "regions": regions,
        "source": "demo",
    }


def scene_row(short, status="ok"):
    return {"short_caption": short, "scene_status": status}


SCENE_REF = reference_row(
    "a",
    [
        obj("ball", "red"),
        obj("box", "green"),
        obj("star", "yellow"),
        reg("grass", "background") | {"caption": "Green grass, covering the bottom 40%."},
    ],
    short="Red ball, green box and yellow star on grass.",
)


def test_scene_caption_scores_over_images_with_an_ok_caption():
    images = [
        # names the ball and the box (plural), and the ball's colour; blue is nobody's colour
        (scene_row("Red ball and blue boxes on grass."), SCENE_REF),
        # not ok: its objects count nowhere
        (scene_row(None, "unparsed"), reference_row("b", [obj("car", "blue")])),
        (scene_row("Blue car on sand.", "truncated"), reference_row("c", [obj("car", "blue")])),
        (None, reference_row("d", [obj("car", "red")])),  # missing from the release
    ]
    scores = records(scene_caption_scores(images, COLOURS))[0]
    assert (scores["images"], scores["ok_captions"], scores["ok_share"]) == (4, 1, 0.25)
    assert (scores["objects"], scores["objects_named"], scores["colours_named"]) == (3, 2, 1)
    assert scores["name_share"] == pytest.approx(2 / 3)
    assert scores["colour_share"] == pytest.approx(1 / 3)
    # the reference's own short caption names all three and their colours
    assert (scores["name_share_reference"], scores["colour_share_reference"]) == (1.0, 1.0)


def test_scene_caption_scores_without_ok_captions_give_none():
    scores = records(scene_caption_scores([(None, SCENE_REF)], COLOURS))[0]
    assert (scores["ok_captions"], scores["ok_share"], scores["objects"]) == (0, 0.0, 0)
    assert pd.isna(scores["name_share"]) and pd.isna(scores["colour_share"])


# Image "a": 3 reference boxes; the release finds both objects (one exactly, one shifted with
# IoU 0.82) and puts its background box in the wrong place: 2 of 3 matched, 1 extra prediction.
REF_A = [
    obj("dog", "red", bbox=[0.0, 0.0, 10.0, 10.0]),
    obj("cat", "green", bbox=[50.0, 50.0, 10.0, 10.0]),
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
        write(
            tmp_path / "r0.parquet",
            [row("a", PRED_A, 3, 10) | {"short_caption": "A red dog beside two cats."}],
        ),
        # no reference for "x": ignored, its boxes count nowhere
        write(tmp_path / "r1.parquet", [row("x", [reg("dog")] * 2, 3, 10)]),
    ]


def by_scope(df):
    return {r["scope"]: r for r in records(df)}


@pytest.fixture
def verified(tmp_path):
    """Image "a"'s verified regions: the dog shown a planted "wolf" and corrected back, the cat
    accepted, the sky rejected with a correction that did not parse."""
    rows = [
        vreg("dog", "corrected", label="dog", bbox=PRED_A[0]["bbox"], planted="wolf", asked=True),
        vreg("cat", "accurate", bbox=PRED_A[1]["bbox"]),
        vreg("sky", "unparsed", bbox=PRED_A[2]["bbox"], kind="background", asked=True),
    ]
    path = tmp_path / "verified.parquet"
    write_rows(rows, VERIFIED_SCHEMA, path)
    return [path]


def score(release, ref, iou_threshold=0.5, verified=()):
    return against_reference(
        release, ref, verified_files=verified, iou_threshold=iou_threshold, colours=COLOURS
    )


def test_against_reference_reads_release_and_reference(release, tmp_path):
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A)], REFERENCE_SCHEMA)
    scores = score(release, ref)
    result = by_scope(scores["region_recall"])
    assert (result["all"]["matched"], result["all"]["predicted"], result["all"]["reference"]) == (
        2,
        3,
        3,
    )
    assert result["all"]["recall"] == pytest.approx(2 / 3)
    assert result["all"]["precision"] == pytest.approx(2 / 3)
    assert (result["foreground"]["recall"], result["foreground"]["precision"]) == (1.0, 1.0)
    assert (result["background"]["recall"], result["background"]["precision"]) == (0.0, 0.0)
    assert result["foreground"]["label_accuracy"] == 1.0
    scene = records(scores["scene_captions"])[0]
    assert (scene["ok_captions"], scene["objects"], scene["objects_named"]) == (1, 2, 2)
    assert scene["colours_named"] == 1  # red, not green


def test_against_reference_counts_images_missing_from_release_as_missed(release, tmp_path):
    missing = reference_row("m", [obj("boat", "blue", bbox=[0.0, 0.0, 20.0, 20.0])])
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A), missing], REFERENCE_SCHEMA)
    result = by_scope(score(release, ref)["region_recall"])
    assert result["all"]["images"] == 2 and result["all"]["missing_images"] == 1
    assert result["all"]["recall"] == pytest.approx(2 / 4)
    assert result["all"]["precision"] == pytest.approx(2 / 3)
    assert result["foreground"]["recall"] == pytest.approx(2 / 3)
    assert result["foreground"]["precision"] == 1.0
    strict = by_scope(score(release, ref, iou_threshold=0.9)["region_recall"])
    assert strict["all"]["matched"] == 1  # the shifted box (IoU 0.82) no longer matches
    assert records(score(release, ref)["scene_captions"])[0]["ok_share"] == 0.5


def test_against_reference_in_summary_json_and_markdown(tables, release, tmp_path):
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A)], REFERENCE_SCHEMA)
    s = summary_dict(tables | score(release, ref))
    s = json.loads(json.dumps(s, allow_nan=False))  # NaN is not JSON
    figures = s["against_reference"]
    assert (figures["images"], figures["missing_images"], figures["iou_threshold"]) == (1, 0, 0.5)
    assert set(figures["regions"]) == {"all", "foreground", "background"}
    assert figures["regions"]["background"] == {
        "reference": 1,
        "predicted": 1,
        "matched": 0,
        "recall": 0.0,
        "precision": 0.0,
        "labels_correct": 0,
        "label_accuracy": None,
    }
    assert figures["scene_captions"]["name_share"] == 1.0
    assert figures["scene_captions"]["colour_share"] == 0.5
    text = summary_markdown(tables | score(release, ref))
    assert "## Against the reference annotations" in text
    assert "| objects named | 2 / 2 (1.000) |" in text
    assert "| object colours named | 1 / 2 (0.500) |" in text


def test_no_predictions_give_no_precision_and_valid_json(tables, tmp_path):
    empty = [write(tmp_path / "r.parquet", [row("a", [], 3, 10)])]
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A)], REFERENCE_SCHEMA)
    summary = summary_dict({**tables, **score(empty, ref)})
    regions = summary["against_reference"]["regions"]["all"]
    assert (regions["recall"], regions["precision"]) == (0.0, None)
    assert summary["against_reference"]["scene_captions"]["ok_captions"] == 0  # no caption
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


# ------------------------------------------------------------ label verification
def vreg(
    original,
    verdict="accurate",
    *,
    key="a",
    bbox,
    label=None,
    planted=None,
    asked=False,
    kind="foreground",
):
    """A verified region: ``label`` is the final one (the shown label unless corrected), the
    shown label is ``planted`` when there is one; ``asked``: a correction was asked."""
    return {
        "key": key,
        "label": label or planted or original,
        "original_label": original,
        "planted_label": planted,
        "bbox": bbox,
        "kind": kind,
        "verdict": verdict,
        "correct_generation": '{"do_sample": false}' if asked else None,
    }


def test_score_verification_of_planted_and_of_right_labels():
    truth = [
        reg("dog", bbox=box(0, 0)),
        reg("cat", bbox=box(30, 0)),
        reg("bush", bbox=box(60, 0)),
        reg("dog", bbox=box(0, 30)),
        reg("sky", "background", bbox=box(0, 60, 100, 40)),
    ]
    verified = [
        # planted, on boxes with a right reference label: counted as planted only
        vreg("dog", "corrected", label="dog", planted="cat", asked=True, bbox=box(0, 30)),
        vreg(
            "sky",
            "corrected",
            label="cloud",
            planted="sea",
            asked=True,
            bbox=box(0, 60, 100, 40),
            kind="background",
        ),
        vreg("dog", "unparsed", planted="wolf", asked=True, bbox=box(80, 80)),  # bad correction
        vreg("dog", "unparsed", planted="cat", bbox=box(80, 80)),  # no yes/no answer
        vreg("dog", "accurate", planted="wolf", bbox=box(80, 80)),  # the wrong label passed
        # unplanted: right labels (one accepted, one rejected), a wrong one, an unmatched one
        vreg(" Dog", "accurate", bbox=box(1, 0)),
        vreg("cat", "corrected", label="lynx", asked=True, bbox=box(30, 0)),
        vreg("tree", "accurate", bbox=box(60, 0)),
        vreg("dog", "accurate", bbox=box(200, 200)),
    ]
    v = records(score_verification([(verified, truth), ([vreg("x", bbox=box(0, 0))], [])]))[0]
    assert (v["images"], v["regions"], v["planted"]) == (2, 10, 5)
    assert (v["planted_rejected"], v["planted_restored"]) == (3, 1)
    assert (v["planted_unparsed"], v["planted_accepted"]) == (2, 1)
    assert (v["planted_rejected_share"], v["planted_restored_share"]) == (0.6, 0.2)
    assert (v["planted_unparsed_share"], v["planted_accepted_share"]) == (0.4, 0.2)
    assert (v["unplanted_right"], v["unplanted_right_accepted"]) == (2, 1)
    assert v["unplanted_right_accepted_share"] == 0.5


def test_score_verification_without_planted_labels_gives_no_shares():
    v = records(score_verification([([vreg("dog", bbox=box(0, 0))], [])]))[0]
    assert (v["planted"], v["unplanted_right"]) == (0, 0)
    assert pd.isna(v["planted_rejected_share"]) and pd.isna(v["unplanted_right_accepted_share"])


def test_verification_against_reference_in_json_markdown_and_card(
    tables, release, verified, tmp_path
):
    ref = write(tmp_path / "ref.parquet", [reference_row("a", REF_A)], REFERENCE_SCHEMA)
    scored = tables | score(release, ref, verified=verified)
    s = json.loads(json.dumps(summary_dict(scored), allow_nan=False))
    v = s["against_reference"]["verification"]
    assert (v["planted"], v["planted_rejected"], v["planted_restored"]) == (1, 1, 1)
    assert (v["planted_restored_share"], v["planted_accepted_share"]) == (1.0, 0.0)
    # the sky's box does not match the reference sky; the cat's does (IoU 0.82)
    assert (v["unplanted_right"], v["unplanted_right_accepted_share"]) == (1, 1.0)
    text = summary_markdown(scored)
    assert "| planted labels restored | 1 / 1 (1.000) |" in text
    assert "| right labels accepted | 1 / 1 (1.000) |" in text
    card = dataset_card(s, {})
    assert "of 1 regions shown a deliberately wrong label, 1.000 were rejected" in card

"""Assemble the release: one row per downloaded image with its captions and key regions.

Inputs per shard, joined on ``key``:

- the download status table (``hic.download.STATUS_SCHEMA``): which images downloaded, their
  URL and ORIGINAL size (the pixels region boxes refer to);
- the scene captions (``hic.caption_scene.SCENE_SCHEMA``): short and long caption, status,
  model and prompt hash;
- the refined regions, one row per region. Only these columns are read: ``key``, ``label``
  (final label), ``bbox`` ([x, y, w, h] in original pixels), ``score``, ``kind``
  (foreground | background), ``rank`` (position within the image's selection), ``verdict``
  (accurate | corrected | unparsed: how the label was obtained), ``caption`` (refined region
  caption, nullable) and ``refine_path`` (llm | fallback | failed: how the caption was
  obtained). Other columns (source, mask_area, raw_caption, ...) stay in the stage outputs.

Per-row word counts are computed here, once, and each shard is also summarised here
(``release_summary``: exact histograms and counts), so the global statistics only merge small
per-shard tables and never read captions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hic.words import word_counts

KIND_ORDER = ("foreground", "background")


def _field(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    # The description travels in the parquet schema and is what the dataset card lists.
    return pa.field(name, type_, metadata={"description": doc})


REGION_TYPE = pa.struct(
    [
        _field("label", pa.string(), "what the region shows (verified or corrected label)"),
        _field("bbox", pa.list_(pa.float64()), "[x, y, w, h] in pixels of the original image"),
        _field("caption", pa.string(), "region caption; null when refinement failed"),
        _field("kind", pa.string(), "foreground (key object) or background (scene region)"),
        _field("score", pa.float64(), "detector or mask score of the region proposal"),
        _field("label_source", pa.string(), "label verification: accurate, corrected or unparsed"),
        _field("caption_source", pa.string(), "caption refinement: llm, fallback or failed"),
    ]
)

#: Columns of the release parquet files, one row per downloaded image.
RELEASE_SCHEMA = pa.schema(
    [
        _field("key", pa.string(), "first 16 hex digits of md5(url); stable image id"),
        _field("url", pa.string(), "image URL from the LAION-style list"),
        _field("alt_text", pa.string(), "the image's alt-text (caption) from that list"),
        _field("width", pa.int64(), "original image width in pixels (the bbox frame)"),
        _field("height", pa.int64(), "original image height in pixels (the bbox frame)"),
        _field(
            "short_caption",
            pa.string(),
            "one-sentence scene caption; null when it did not parse (an unparsed row may keep "
            "the other caption)",
        ),
        _field("long_caption", pa.string(), "dense scene caption; null when it did not parse"),
        _field(
            "regions",
            pa.list_(REGION_TYPE),
            "key regions, foreground first, each in rank order; empty when none was found",
        ),
        _field(
            "regions_note",
            pa.string(),
            "why regions is empty: 'no proposal' (the detector found none of the candidate "
            "names, or the image did not decode) or 'none selected' (every proposal was "
            "filtered out); null when there are regions",
        ),
        _field(
            "scene_status",
            pa.string(),
            "scene captioning: ok, unparsed, truncated, repetitive or failed",
        ),
        _field("scene_model", pa.string(), "scene captioning model id"),
        _field("scene_model_revision", pa.string(), "its revision (null for a local folder)"),
        _field("scene_prompt_hash", pa.string(), "hash of the scene prompts"),
        _field("region_provenance", pa.string(), "JSON: region stages' models and prompt hashes"),
        _field("code_version", pa.string(), "git describe of the workflow that built the row"),
        _field("short_words", pa.int32(), "words in short_caption (0 when null)"),
        _field("long_words", pa.int32(), "words in long_caption (0 when null)"),
        _field("region_count", pa.int32(), "number of regions"),
        _field("region_words", pa.list_(pa.int32()), "words of each region caption (0 when null)"),
    ]
)

_REGION_COLUMNS = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.string()),
        ("bbox", pa.list_(pa.float64())),
        ("caption", pa.string()),
        ("kind", pa.string()),
        ("score", pa.float64()),
        ("verdict", pa.string()),
        ("refine_path", pa.string()),
        ("rank", pa.int32()),
    ]
)


_SCENE_COLUMNS = [
    "key",
    "short_caption",
    "long_caption",
    "status",
    "model_id",
    "model_revision",
    "prompt_hash",
]
# Region columns of the refined table, in REGION_TYPE's field order.
_STRUCT_SOURCES = ["label", "bbox", "caption", "kind", "score", "verdict", "refine_path"]


class AssembleError(ValueError):
    """The stage tables of a shard do not fit together."""


def _keys_text(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:5])
    return f"{len(keys)} key(s): {shown}{', ...' if len(keys) > 5 else ''}"


def _downloaded(status: Path) -> pa.Table:
    table = pq.read_table(
        status, columns=["key", "url", "caption", "status", "original_width", "original_height"]
    )
    table = table.filter(pc.equal(table["status"], "success"))
    for col in ("original_width", "original_height"):
        if table[col].null_count:
            raise AssembleError(f"{status}: downloaded rows without {col}")
    return table


def _scene_rows(scene: Path, keys: pa.Array) -> pa.Table:
    """Scene rows in the order of ``keys``; every key must have exactly one."""
    table = pq.read_table(scene, columns=_SCENE_COLUMNS)
    if len(pc.unique(table["key"])) != table.num_rows:
        raise AssembleError(f"{scene}: duplicate keys in the scene table")
    index = pc.index_in(keys, value_set=table["key"].combine_chunks())
    if index.null_count:
        missing = pc.filter(keys, pc.is_null(index)).to_pylist()
        raise AssembleError(f"{scene} lacks downloaded {_keys_text(missing)}")
    return table.take(index)


def _region_lists(regions: Path, keys: pa.Array) -> tuple[pa.ListArray, pa.ListArray, np.ndarray]:
    """(regions, region_words, counts) per key, in the order of ``keys``."""
    table = pq.read_table(regions, columns=_REGION_COLUMNS.names).cast(_REGION_COLUMNS)
    position = pc.index_in(table["key"], value_set=keys)
    if position.null_count:
        stray = pc.unique(pc.filter(table["key"], pc.is_null(position))).to_pylist()
        raise AssembleError(
            f"{regions} has regions of images that did not download: {_keys_text(stray)}"
        )
    kind = pc.index_in(table["kind"], value_set=pa.array(KIND_ORDER))
    if kind.null_count:
        unknown = pc.unique(pc.filter(table["kind"], pc.is_null(kind))).to_pylist()
        raise AssembleError(f"{regions}: unknown region kind(s) {unknown}; expected {KIND_ORDER}")
    order = pc.sort_indices(
        pa.table({"position": position, "kind": kind, "rank": table["rank"]}),
        sort_keys=[("position", "ascending"), ("kind", "ascending"), ("rank", "ascending")],
    )
    table = table.take(order)
    counts = np.bincount(pc.take(position, order).to_numpy(), minlength=len(keys))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    children = [table[c].combine_chunks() for c in _STRUCT_SOURCES]
    structs = pa.StructArray.from_arrays(children, fields=list(REGION_TYPE))
    words = word_counts(table["caption"].combine_chunks())
    return (
        pa.ListArray.from_arrays(offsets, structs, type=pa.list_(REGION_TYPE)),
        pa.ListArray.from_arrays(offsets, words, type=pa.list_(pa.int32())),
        counts,
    )


#: Per-shard summary of the release: one long table of exact counts, merged across shards by
#: ``hic.dataset_stats``. Each ``measure`` is one GROUP BY of the release rows:
#:
#: - ``regions_per_image``: value = regions of an image, count = images;
#: - ``caption_words``: key = short | long | region, value = words (0: caption missing),
#:   count = captions;
#: - ``label``: key = region label, count = regions, images = images showing it (a key lives in
#:   one shard only, so images add up across shards);
#: - ``region_kind``, ``label_source``, ``caption_source``: key = the region field, count = regions;
#: - ``scene_status``: key = the status, count = images;
#: - ``regions_note``: key = why an image has no region, count = images;
#: - ``provenance``: key = JSON object of the five provenance columns (``scene_model`` to
#:   ``code_version``), count = images.
SUMMARY_SCHEMA = pa.schema(
    [
        _field("measure", pa.string(), "which distribution or count the row belongs to"),
        _field("key", pa.string(), "category within the measure; null when it has none"),
        _field("value", pa.int32(), "integer measured (words, regions); null for category counts"),
        _field("count", pa.int64(), "rows (images, captions or regions) with this key and value"),
        _field("images", pa.int64(), "distinct images, for labels; null otherwise"),
    ]
)

# One branch per measure; hic.dataset_stats sums the counts over shards.
_SUMMARY_SQL = """
WITH region_rows AS MATERIALIZED (SELECT key, unnest(regions) AS r FROM release),
region_words AS MATERIALIZED (SELECT unnest(region_words) AS words FROM release)
SELECT 'regions_per_image' AS measure, NULL::VARCHAR AS key, region_count AS value,
    count(*) AS count, NULL::BIGINT AS images FROM release GROUP BY ALL
UNION ALL SELECT 'caption_words', 'short', short_words, count(*), NULL FROM release GROUP BY ALL
UNION ALL SELECT 'caption_words', 'long', long_words, count(*), NULL FROM release GROUP BY ALL
UNION ALL SELECT 'caption_words', 'region', words, count(*), NULL FROM region_words GROUP BY ALL
UNION ALL SELECT 'label', r.label, NULL, count(*), count(DISTINCT key) FROM region_rows
    GROUP BY ALL
UNION ALL SELECT 'region_kind', r.kind, NULL, count(*), NULL FROM region_rows GROUP BY ALL
UNION ALL SELECT 'label_source', r.label_source, NULL, count(*), NULL FROM region_rows
    GROUP BY ALL
UNION ALL SELECT 'caption_source', r.caption_source, NULL, count(*), NULL FROM region_rows
    GROUP BY ALL
UNION ALL SELECT 'scene_status', scene_status, NULL, count(*), NULL FROM release GROUP BY ALL
UNION ALL SELECT 'regions_note', regions_note, NULL, count(*), NULL FROM release
    WHERE regions_note IS NOT NULL GROUP BY ALL
UNION ALL SELECT 'provenance', to_json({
        'scene_model': scene_model, 'scene_model_revision': scene_model_revision,
        'scene_prompt_hash': scene_prompt_hash, 'region_provenance': region_provenance,
        'code_version': code_version
    })::VARCHAR, NULL, n, NULL
    FROM (SELECT scene_model, scene_model_revision, scene_prompt_hash, region_provenance,
        code_version, count(*) AS n FROM release GROUP BY ALL)
ORDER BY measure, key NULLS FIRST, value NULLS FIRST
"""


def release_summary(release: pa.Table) -> pa.Table:
    """The ``SUMMARY_SCHEMA`` rows of a shard's release rows (``RELEASE_SCHEMA``), sorted."""
    with duckdb.connect() as con:
        con.register("release", release)
        return con.sql(_SUMMARY_SQL).to_arrow_table().cast(SUMMARY_SCHEMA)


def assemble_shard(
    status: Path,
    scene: Path,
    proposals: Path,
    regions: Path,
    out: Path,
    summary: Path,
    *,
    region_provenance: dict,
    code_version: str,
) -> dict:
    """Write the release rows of one shard to ``out`` and their ``release_summary`` to
    ``summary``; return a count summary.

    One row per downloaded image, in status-table order; ``proposals`` (the propose_regions
    table) tells an image nothing was proposed for from one whose proposals were all filtered
    out. Raises ``AssembleError`` when the scene table lacks a downloaded key or the regions
    name a key that did not download.
    """
    images = _downloaded(status)
    keys = images["key"].combine_chunks()
    captions = _scene_rows(scene, keys)
    region_lists, region_words, counts = _region_lists(regions, keys)
    n = len(keys)
    proposed = pc.is_in(keys, value_set=pq.read_table(proposals, columns=["key"])["key"])
    notes = pc.if_else(
        pa.array(counts > 0),
        pa.nulls(n, pa.string()),
        pc.if_else(proposed, "none selected", "no proposal"),
    )
    table = pa.table(
        {
            "key": keys,
            "url": images["url"],
            "alt_text": images["caption"],
            "width": images["original_width"],
            "height": images["original_height"],
            "short_caption": captions["short_caption"],
            "long_caption": captions["long_caption"],
            "regions": region_lists,
            "regions_note": notes,
            "scene_status": captions["status"],
            "scene_model": captions["model_id"],
            "scene_model_revision": captions["model_revision"],
            "scene_prompt_hash": captions["prompt_hash"],
            "region_provenance": pa.repeat(json.dumps(region_provenance, sort_keys=True), n),
            "code_version": pa.repeat(code_version, n),
            "short_words": word_counts(captions["short_caption"]),
            "long_words": word_counts(captions["long_caption"]),
            "region_count": pa.array(counts, pa.int32()),
            "region_words": region_words,
        },
        schema=RELEASE_SCHEMA,
    )
    for path, content in ((out, table), (summary, release_summary(table))):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(content, path)
    return {
        "images": n,
        "regions": int(counts.sum()),
        "images_without_regions": int((counts == 0).sum()),
        "regions_notes": dict(Counter(notes.drop_null().to_pylist())),
        "scene_status": dict(Counter(captions["status"].to_pylist())),
    }


_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
]

_LOADING = """\
```python
from pathlib import Path
files = sorted(Path("release").glob("*.parquet"))  # the folder holding this card

import pyarrow.parquet as pq
table = pq.read_table(files)

import pandas as pd
df = pd.read_parquet(files)  # regions: a list of dicts per row

import duckdb
duckdb.sql("SELECT r.label, count(*) AS n FROM read_parquet('release/*.parquet'), "
           "unnest(regions) AS u(r) GROUP BY 1 ORDER BY n DESC")

from datasets import load_dataset
ds = load_dataset("parquet", data_files="release/*.parquet", split="train")
```"""


def _size_category(n: int) -> str:
    return next((name for bound, name in _SIZE_CATEGORIES if n < bound), "100M<n<1B")


def _described(field: pa.Field, prefix: str = "") -> list[str]:
    """Markdown table rows of a column; the regions struct's fields follow it."""
    doc = field.metadata[b"description"].decode()
    nested = field.type == pa.list_(REGION_TYPE)
    shown = "list<struct>" if nested else str(field.type).replace("item: ", "")
    rows = [f"| `{prefix}{field.name}` | {shown} | {doc} |"]
    if nested:
        rows += [row for child in REGION_TYPE for row in _described(child, f"{field.name}[].")]
    return rows


def _counts_text(counts: dict[str, int], shares: bool = False) -> str:
    # Most frequent first: the summary JSON is written with sorted keys.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(counts.values())
    return (
        ", ".join(f"{k}: {v}" + (f" ({v / total:.1%})" if shares else "") for k, v in ranked)
        or "none"
    )


_SCOPE_ORDER = ("all", "foreground", "background")


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _reference_lines(scores: dict | None) -> list[str]:
    """The card's section on the release scored against reference annotations (the demo
    world's; ``hic.dataset_stats.summary_dict``'s ``against_reference``), or nothing."""
    if not scores:
        return []
    scene = scores["scene_captions"]
    lines = [
        "## Measured against the reference annotations",
        "",
        f"On {scores['images']} images with reference annotations "
        f"({scores['missing_images']} missing from this release). Regions are matched "
        f"one-to-one at IoU >= {scores['iou_threshold']:g}; label accuracy is over matched "
        "regions.",
        "",
        "| regions | reference | predicted | recall | precision | label accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {scope} | {r['reference']} | {r['predicted']} | {_figure(r['recall'])} "
            f"| {_figure(r['precision'])} | {_figure(r['label_accuracy'])} |"
            # the JSON's keys are sorted; the card keeps the table's order
            for scope, r in sorted(
                scores["regions"].items(), key=lambda kv: _SCOPE_ORDER.index(kv[0])
            )
        ),
        "",
        f"Short scene captions: {_figure(scene['ok_share'])} of the images have an ok one; in "
        f"those, {_figure(scene['name_share'])} of the reference's objects are named and "
        f"{_figure(scene['colour_share'])} have their colour named (the reference's own short "
        f"captions: {_figure(scene['name_share_reference'])} and "
        f"{_figure(scene['colour_share_reference'])}).",
        "",
        _verification_line(scores["verification"]),
        "",
    ]
    return lines


def _verification_line(v: dict) -> str:
    right = (
        f"of the {v['unplanted_right']} regions whose label is the reference's, "
        f"{_figure(v['unplanted_right_accepted_share'])} were accepted."
    )
    if not v["planted"]:
        return f"Label verification (no wrong labels were planted): {right}"
    return (
        f"Label verification: of {v['planted']} regions shown a deliberately wrong label, "
        f"{_figure(v['planted_rejected_share'])} were rejected, "
        f"{_figure(v['planted_restored_share'])} corrected back to their own label, "
        f"{_figure(v['planted_unparsed_share'])} unparsed and "
        f"{_figure(v['planted_accepted_share'])} accepted; {right}"
    )


def _tiny_models(models: dict) -> list[str]:
    # The embedded default builds resources/models/tiny-*: real architectures, random weights.
    return sorted(role for role, m in models.items() if Path(m["id"]).name.startswith("tiny-"))


def dataset_card(summary: dict, config: dict) -> str:
    """A Hugging Face dataset card (README.md) for the release folder.

    ``summary`` is ``hic.dataset_stats.summary_dict`` of the release; ``config`` is the
    workflow config, of which ``models`` (role -> {id, revision}) is listed.
    """
    models = config.get("models", {})
    tiny = _tiny_models(models)
    words = summary["caption_words"]
    lines = [
        "---",
        "# The paper's terms: annotations CC BY 4.0, academic research only, no images.",
        "license: cc-by-4.0",
        "pretty_name: HIC-12M (rebuilt)",
        "language:",
        "- en",
        "task_categories:",
        "- image-to-text",
        "- text-to-image",
        "size_categories:",
        f"- {_size_category(summary['images'])}",
        "configs:",
        "- config_name: default",
        '  data_files: "*.parquet"',
        "---",
        "",
        "# HIC-12M (rebuilt)",
        "",
    ]
    if tiny:
        lines += [
            f"> **Noise, not captions.** This build used tiny randomly initialised models "
            f"({', '.join(tiny)}): it exercises the pipeline, its texts and labels mean nothing.",
            "",
        ]
    lines += [
        "Hierarchical dense image captions in the format of HIC-12M: for every image a short "
        "caption, a long caption, and captions of its key regions (foreground objects and the "
        "background regions that set the scene), each with a label and a box. Images are not "
        "included; each row carries the image URL and the original size its boxes refer to.",
        "",
        "## Contents",
        "",
        f"- Images: {summary['images']}",
        f"- Regions: {summary['regions']} ({summary['regions_per_image']:.2f} per image; "
        f"{summary['images_without_regions']} images without regions"
        + (f": {_counts_text(summary['regions_notes'])}" if summary.get("regions_notes") else "")
        + ")",
        f"- Regions by kind: {_counts_text(summary['region_kinds'])}",
        f"- Label vocabulary: {summary['label_vocabulary']} distinct labels; most frequent: "
        f"{_counts_text(summary['top_labels'])}",
        f"- Label verification outcomes: {_counts_text(summary['label_sources'], shares=True)}",
        "- Region caption refinement paths: "
        + _counts_text(summary["caption_sources"], shares=True),
        f"- Scene caption status: {_counts_text(summary['scene_status'], shares=True)}",
        "- Mean caption length (words, captions that exist): "
        + ", ".join(f"{k}: {v['mean']}" for k, v in words.items()),
        "",
        *_reference_lines(summary.get("against_reference")),
        "## Columns",
        "",
        "| column | type | meaning |",
        "| --- | --- | --- |",
        *(line for field in RELEASE_SCHEMA for line in _described(field)),
        "",
        "## Models and prompts",
        "",
        "| role | model | revision |",
        "| --- | --- | --- |",
        *(f"| {role} | `{m['id']}` | {m.get('revision') or 'n/a'} |" for role, m in models.items()),
        "",
        "As recorded in the rows (scene model, prompt hash, region stages, code version):",
        "",
    ]
    for p in summary["provenance"]:
        lines += [
            f"- {p['images']} images: scene model `{p['scene_model']}` "
            f"(revision {p['scene_model_revision'] or 'n/a'}), scene prompt hash "
            f"`{p['scene_prompt_hash']}`, code version `{p['code_version']}`; region stages:",
            "",
            "  ```json",
            *(
                f"  {line}"
                for line in json.dumps(p["regions"], indent=2, sort_keys=True).split("\n")
            ),
            "  ```",
            "",
        ]
    lines += [
        "## Loading",
        "",
        _LOADING,
        "",
        "## License",
        "",
        "The terms HIC-12M is released under: the annotations (captions, labels, boxes) under "
        "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/), for academic research "
        "only. The images are not redistributed: they stay with their owners, and each row "
        "carries only the image's URL, its LAION alt-text and its size. URLs and alt-texts "
        "come from LAION; the captions were generated by the models listed above, under "
        "their licenses.",
        "",
        "## Caveats",
        "",
        "- The workflow's embedded default uses tiny random models of the real architectures, so "
        "its captions, labels and boxes are noise: it tests the pipeline, not caption quality.",
        "- URLs rot: a share of the images will no longer download.",
        "",
    ]
    return "\n".join(lines)

"""Statistics of the assembled release, merged with DuckDB from per-shard summaries.

The assemble stage writes, next to each release shard, its summary (``hic.assemble.
SUMMARY_SCHEMA``: exact integer histograms and counts). This stage sums those small tables over
all shards and reads no release row: counts, quantiles (DuckDB's quantile_disc rule), minima
and maxima come from the merged histograms and equal those of a query over every row. A mean is
the exact integer total over the count, divided in double precision; DuckDB's avg of INTEGER
divides in long double, which can differ in the last bit: it would show after rounding to 2-3
decimals only if the exact mean lay within that bit of a rounding boundary.

Caption lengths are measured over captions that exist (words > 0); a missing caption is counted
separately rather than as a zero-word caption. Only the region recall against reference
annotations (the demo world) reads the release shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from hic.select_regions import match_regions, recall_precision  # noqa: E402

CAPTION_KINDS = ("short", "long", "region")

_MERGED = (
    "SELECT measure, key, value, sum(count)::BIGINT AS count, sum(images)::BIGINT AS images "
    "FROM summaries GROUP BY ALL"
)
# Histograms with, per value, how many items have it or less (``cumulative``) and how many are
# in its group (``n``): what an exact quantile needs.
_IMAGES = (
    "SELECT value AS regions, count AS images, "
    "sum(count) OVER (ORDER BY value)::BIGINT AS cumulative, sum(count) OVER ()::BIGINT AS n "
    "FROM merged WHERE measure = 'regions_per_image'"
)
_WORDS = (
    "SELECT key AS kind, value AS words, count, "
    "sum(count) OVER (PARTITION BY key, value > 0 ORDER BY value)::BIGINT AS cumulative, "
    "sum(count) OVER (PARTITION BY key, value > 0)::BIGINT AS n "
    "FROM merged WHERE measure = 'caption_words'"
)
_PROVENANCE = ", ".join(
    f"key->>'{c}' AS {c}"
    for c in (
        "scene_model",
        "scene_model_revision",
        "scene_prompt_hash",
        "region_provenance",
        "code_version",
    )
)


def _counts(con: duckdb.DuckDBPyConnection, column: str, measure: str) -> pd.DataFrame:
    return con.execute(
        f"SELECT key AS {column}, count, round(count / sum(count) OVER (), 4) AS fraction "
        "FROM merged WHERE measure = ? ORDER BY count DESC, 1",
        [measure],
    ).df()


def _quantiles(quantiles: Sequence[float], value: str, where: str = "true") -> str:
    """quantile_disc over a histogram: the smallest value whose cumulative count reaches rank
    max(1, n - floor(n - n·q)), i.e. ceil(n·q), computed as DuckDB does; q is written as the
    same SQL literal (a DECIMAL, so the arithmetic is exact)."""
    return ", ".join(
        f"min({value}) FILTER ({where} AND cumulative >= greatest(1, n - floor(n - n * {q}))) "
        f'AS "q{q:g}"'
        for q in quantiles
    )


def dataset_stats(
    summaries: Sequence[Path], *, quantiles: Sequence[float], top_labels: int
) -> dict[str, pd.DataFrame]:
    """Tables over all release shards, from their summaries (``hic.assemble.release_summary``)."""
    con = duckdb.connect()
    con.read_parquet([str(f) for f in summaries]).create_view("summaries")
    con.execute(f"CREATE TABLE merged AS {_MERGED}")
    con.execute(f"CREATE VIEW images AS {_IMAGES}")
    con.execute(f"CREATE VIEW words AS {_WORDS}")
    tables = {
        "overview": con.execute(
            "SELECT coalesce(sum(images), 0)::BIGINT AS images, "
            "coalesce(sum(regions * images), 0)::BIGINT AS regions, "
            "round(coalesce(sum(regions * images) / sum(images), 0), 3) AS regions_per_image, "
            "coalesce(sum(images) FILTER (regions = 0), 0)::BIGINT AS images_without_regions, "
            "(SELECT count(key) FROM merged WHERE measure = 'label') AS label_vocabulary "
            "FROM images"
        ).df(),
        "regions_per_image": con.execute(
            f"SELECT coalesce(sum(images), 0)::BIGINT AS images, min(regions) AS min, "
            f"{_quantiles(quantiles, 'regions')}, max(regions) AS max, "
            f"round(sum(regions * images) / sum(images), 2) AS mean FROM images"
        ).df(),
        "regions_per_image_histogram": con.execute(
            "SELECT regions, images FROM images ORDER BY 1"
        ).df(),
        "caption_words": con.execute(
            f"SELECT kind, coalesce(sum(count) FILTER (words > 0), 0)::BIGINT AS n, "
            f"coalesce(sum(count) FILTER (words = 0), 0)::BIGINT AS missing, "
            f"min(words) FILTER (words > 0) AS min, "
            f"{_quantiles(quantiles, 'words', 'words > 0')}, max(words) FILTER (words > 0) "
            f"AS max, round(sum(words * count) / sum(count) FILTER (words > 0), 2) AS mean "
            f"FROM words GROUP BY kind ORDER BY list_position({list(CAPTION_KINDS)}, kind)"
        ).df(),
        "caption_words_histogram": con.execute(
            "SELECT kind, words, count FROM words WHERE words > 0 ORDER BY 1, 2"
        ).df(),
        "labels": con.execute(
            "SELECT key AS label, count, images FROM merged WHERE measure = 'label' "
            "ORDER BY count DESC, label LIMIT ?",
            [top_labels],
        ).df(),
        "region_kinds": _counts(con, "kind", "region_kind"),
        "label_sources": _counts(con, "label_source", "label_source"),
        "caption_sources": _counts(con, "caption_source", "caption_source"),
        "scene_status": _counts(con, "scene_status", "scene_status"),
        "regions_notes": _counts(con, "regions_note", "regions_note"),
        "provenance": con.execute(
            f"SELECT {_PROVENANCE}, count AS images FROM merged WHERE measure = 'provenance' "
            "ORDER BY images DESC, key"
        ).df(),
    }
    con.close()
    return tables


def _release_regions(files: Sequence[Path], keys: list[str]) -> dict[str, list[dict]]:
    """Regions of the release rows whose key is in ``keys``."""
    con = duckdb.connect()
    rows = con.sql(
        "SELECT key, regions FROM read_parquet($1) WHERE key IN (SELECT unnest($2))",
        params=[[str(f) for f in files], keys],
    ).to_arrow_table()
    con.close()
    return {r["key"]: r["regions"] for r in rows.to_pylist()}


def region_recall(
    release_files: Sequence[Path], reference: Path, iou_threshold: float = 0.5
) -> pd.DataFrame:
    """Box recall and precision of the release against reference annotations (the demo world).

    Per image, predicted and reference boxes are matched one-to-one (``match_regions``), over
    all regions and over foreground regions only. A reference image missing from the release
    counts as all-missed; release images without a reference are ignored (nothing to score).
    """
    ref = pq.read_table(reference, columns=["key", "regions"]).to_pylist()
    predicted = _release_regions(release_files, [r["key"] for r in ref])
    rows = []
    for scope, kinds in (("all", {"foreground", "background"}), ("foreground", {"foreground"})):
        matched = n_pred = n_ref = 0
        for image in ref:
            truth = [r["bbox"] for r in image["regions"] if r["kind"] in kinds]
            pred = [r["bbox"] for r in predicted.get(image["key"], []) if r["kind"] in kinds]
            matched += match_regions(pred, truth, iou_threshold)
            n_pred += len(pred)
            n_ref += len(truth)
        recall, precision = recall_precision(matched, n_pred, n_ref)
        rows.append(
            {
                "scope": scope,
                "images": len(ref),
                "missing_images": sum(r["key"] not in predicted for r in ref),
                "reference": n_ref,
                "predicted": n_pred,
                "matched": matched,
                "recall": recall,
                "precision": precision,
                "iou_threshold": iou_threshold,
            }
        )
    return pd.DataFrame(rows)


def _as_dict(table: pd.DataFrame, column: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in zip(table[column], table["count"], strict=True)}


def _optional(value: object) -> object:
    return None if pd.isna(value) else value


def summary_dict(tables: dict[str, pd.DataFrame]) -> dict:
    """JSON-able numbers for the dataset card."""
    overview = tables["overview"].iloc[0]
    words = tables["caption_words"].set_index("kind")
    provenance = tables["provenance"]
    return {
        "images": int(overview["images"]),
        "regions": int(overview["regions"]),
        "regions_per_image": float(overview["regions_per_image"]),
        "images_without_regions": int(overview["images_without_regions"]),
        "label_vocabulary": int(overview["label_vocabulary"]),
        "top_labels": _as_dict(tables["labels"], "label"),
        "region_kinds": _as_dict(tables["region_kinds"], "kind"),
        "label_sources": _as_dict(tables["label_sources"], "label_source"),
        "caption_sources": _as_dict(tables["caption_sources"], "caption_source"),
        "scene_status": _as_dict(tables["scene_status"], "scene_status"),
        "regions_notes": _as_dict(tables["regions_notes"], "regions_note"),
        "caption_words": {
            kind: {
                "captions": int(words.loc[kind, "n"]),
                "missing": int(words.loc[kind, "missing"]),
                "mean": _optional(float(words.loc[kind, "mean"])),
            }
            for kind in words.index
        },
        "region_recall": (
            {
                row.scope: {"recall": _optional(row.recall), "precision": _optional(row.precision)}
                for row in tables["region_recall"].itertuples(index=False)
            }
            if "region_recall" in tables
            else None
        ),
        "provenance": [
            {
                "scene_model": row.scene_model,
                "scene_model_revision": row.scene_model_revision,
                "scene_prompt_hash": row.scene_prompt_hash,
                "regions": json.loads(row.region_provenance),
                "code_version": row.code_version,
                "images": int(row.images),
            }
            for row in provenance.itertuples(index=False)
        ],
    }


def summary_markdown(tables: dict[str, pd.DataFrame]) -> str:
    s = summary_dict(tables)
    lines = [
        "# Dataset statistics",
        "",
        f"- Images: {s['images']}; regions: {s['regions']} "
        f"({s['regions_per_image']:.2f} per image, {s['images_without_regions']} images without)",
        f"- Label vocabulary: {s['label_vocabulary']} distinct labels",
        "",
    ]
    for name, title in [
        ("regions_per_image", "Regions per image"),
        ("caption_words", "Caption length (words; captions that exist)"),
        ("region_kinds", "Regions by kind"),
        ("labels", "Most frequent labels"),
        ("label_sources", "Label verification outcomes"),
        ("caption_sources", "Region caption refinement paths"),
        ("scene_status", "Scene caption status"),
        ("regions_notes", "Images without regions, by reason"),
        ("region_recall", "Region recall and precision against the reference boxes"),
    ]:
        if name in tables:  # region_recall needs reference annotations (the demo world)
            lines += [f"## {title}", "", tables[name].to_markdown(index=False), ""]
    return "\n".join(lines)


def plot_dataset(tables: dict[str, pd.DataFrame], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    hist = tables["regions_per_image_histogram"]
    axes[0].bar(hist["regions"], hist["images"], color="tab:blue")
    axes[0].set(title="Regions per image", xlabel="regions", ylabel="images")
    words = tables["caption_words_histogram"]
    for kind in CAPTION_KINDS:
        part = words[words["kind"] == kind]
        if len(part):
            axes[1].hist(part["words"], bins=30, weights=part["count"], histtype="step", label=kind)
    axes[1].set(title="Caption length", xlabel="words", ylabel="captions")
    if len(words):  # a legend without lines only warns
        axes[1].legend()
    labels = tables["labels"]
    axes[2].barh(labels["label"], labels["count"], color="tab:orange")
    axes[2].invert_yaxis()
    axes[2].set(title="Most frequent labels", xlabel="regions")
    fig.savefig(path, dpi=120)
    plt.close(fig)

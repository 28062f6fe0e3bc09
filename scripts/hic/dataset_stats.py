"""Statistics of the assembled release, merged with DuckDB from per-shard summaries.

The assemble stage writes, next to each release shard, its summary (``hic.assemble.
SUMMARY_SCHEMA``: exact integer histograms and counts). This stage sums those small tables over
all shards and reads no release row: counts, quantiles (DuckDB's quantile_disc rule), minima
and maxima come from the merged histograms and equal those of a query over every row. A mean is
the exact integer total over the count, divided in double precision; DuckDB's avg of INTEGER
divides in long double, which can differ in the last bit: it would show after rounding to 2-3
decimals only if the exact mean lay within that bit of a rounding boundary.

Caption lengths are measured over captions that exist (words > 0); a missing caption is counted
separately rather than as a zero-word caption. ``stage_outcomes`` gives, per stage, the rows
(images or regions) per value of its status column in the release, with their shares.

Only the scores against reference annotations (the demo world: ``against_reference``) read the
release shards: region recall and precision at an IoU threshold, overall and per kind, the label
accuracy of matched regions, and how well the short scene captions name the reference's objects
and their colours. With the demo's random tiny models these are near zero; they measure
trained ones. Label verification is scored from the verified region tables (``hic.region_tables.
VERIFIED_SCHEMA``), which keep what the release drops: the labels planted deliberately wrong
(``verify_labels.plant_wrong``) and the labels the verifier was shown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from hic.select_regions import match_pairs, recall_precision  # noqa: E402
from hic.text import normalise_label  # noqa: E402

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


SCOPES = {
    "all": ("foreground", "background"),
    "foreground": ("foreground",),
    "background": ("background",),
}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def score_regions(
    images: Sequence[tuple[Sequence[dict] | None, Sequence[dict]]], iou_threshold: float = 0.5
) -> pd.DataFrame:
    """Box recall and precision, and label accuracy of the matched boxes, per scope.

    ``images`` holds per reference image (release regions, or None when the image is missing
    from the release; reference regions), each region a dict with ``label``, ``bbox`` and
    ``kind``. Per image and scope (all regions, foreground only, background only), predicted and
    reference boxes are matched one-to-one (``match_pairs``); in the ``all`` scope a box may
    match one of the other kind. A matched box's label is correct when it equals the reference
    label after ``normalise_label``. Ratios with a zero denominator are None.
    """
    rows = []
    for scope, kinds in SCOPES.items():
        matched = n_pred = n_ref = correct = 0
        for predicted, truth in images:
            ref = [r for r in truth if r["kind"] in kinds]
            pred = [r for r in predicted or [] if r["kind"] in kinds]
            pairs = match_pairs([r["bbox"] for r in pred], [r["bbox"] for r in ref], iou_threshold)
            matched += len(pairs)
            correct += sum(
                normalise_label(pred[i]["label"] or "") == normalise_label(ref[j]["label"])
                for i, j in pairs
            )
            n_pred += len(pred)
            n_ref += len(ref)
        recall, precision = recall_precision(matched, n_pred, n_ref)
        rows.append(
            {
                "scope": scope,
                "images": len(images),
                "missing_images": sum(p is None for p, _ in images),
                "reference": n_ref,
                "predicted": n_pred,
                "matched": matched,
                "recall": recall,
                "precision": precision,
                "labels_correct": correct,
                "label_accuracy": _share(correct, matched),
                "iou_threshold": iou_threshold,
            }
        )
    return pd.DataFrame(rows)


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.casefold())


def _plural_forms(word: str) -> set[str]:
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    return forms


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` names ``name``: its words in order as whole words, case-folded, the
    last one also in a plural form ("box" in "two boxes", "ice cream" in "ice creams")."""
    target, words = _words(name), _words(text)
    if not target:
        return False
    *head, last = target
    forms, n = _plural_forms(last), len(target)
    return any(
        words[k : k + n - 1] == head and words[k + n - 1] in forms
        for k in range(len(words) - n + 1)
    )


def object_colour(region_caption: str | None, colours: Collection[str]) -> str | None:
    """A demo reference object's colour: the first word of its region caption that is one of
    ``colours`` ("A small red ball, round, ..."); None when none is."""
    return next((w for w in _words(region_caption or "") if w in colours), None)


def scene_caption_scores(
    images: Sequence[tuple[dict | None, dict]], colours: Collection[str]
) -> pd.DataFrame:
    """How well the short scene captions name the reference's objects (one row).

    ``images`` holds per reference image (its release row with ``short_caption`` and
    ``scene_status``, or None when the image is missing from the release; its reference row
    with ``short_caption`` and ``regions``). ``ok_share`` is the share of reference images
    whose release short caption exists with status ``ok``. Over those images only, each
    foreground reference region is an object: ``name_share`` is the share whose label the
    short caption ``mentions``, ``colour_share`` the share whose colour (``object_colour``) it
    mentions. The ``*_reference`` shares are the same measures of the reference's own short
    caption on the same images: the ceiling, since it names at most three objects.
    """
    ok = objects = 0
    named = {"release": 0, "reference": 0}
    coloured = {"release": 0, "reference": 0}
    for release, ref in images:
        if release is None or release["scene_status"] != "ok" or not release["short_caption"]:
            continue
        ok += 1
        captions = {"release": release["short_caption"], "reference": ref["short_caption"] or ""}
        for region in ref["regions"]:
            if region["kind"] != "foreground":
                continue
            objects += 1
            colour = object_colour(region["caption"], colours)
            for side, caption in captions.items():
                named[side] += mentions(caption, region["label"])
                coloured[side] += colour is not None and mentions(caption, colour)
    return pd.DataFrame(
        [
            {
                "images": len(images),
                "ok_captions": ok,
                "ok_share": _share(ok, len(images)),
                "objects": objects,
                "objects_named": named["release"],
                "name_share": _share(named["release"], objects),
                "colours_named": coloured["release"],
                "colour_share": _share(coloured["release"], objects),
                "name_share_reference": _share(named["reference"], objects),
                "colour_share_reference": _share(coloured["reference"], objects),
            }
        ]
    )


#: Columns of the verified region tables that ``score_verification`` reads.
VERIFIED_COLUMNS = [
    "key",
    "label",
    "original_label",
    "planted_label",
    "bbox",
    "kind",
    "verdict",
    "correct_generation",
]


def _same_label(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalise_label(a) == normalise_label(b)


def score_verification(
    images: Sequence[tuple[Sequence[dict], Sequence[dict]]], iou_threshold: float = 0.5
) -> pd.DataFrame:
    """How label verification treats labels known to be wrong, and labels known to be right
    (one row).

    ``images`` holds per image (its verified regions, with ``VERIFIED_COLUMNS``; its reference
    regions, empty when it has none). A planted region (``planted_label`` set: the verifier was
    shown a deliberately wrong label) is ``accepted`` when its verdict is accurate,
    ``rejected`` when the model answered no (a correction was asked: ``correct_generation`` is
    set), ``restored`` when that correction is the label before planting (``original_label``,
    after ``normalise_label``) and ``unparsed`` by its verdict; a rejected label whose
    correction did not parse is both rejected and unparsed, and one the model did not answer
    about is neither accepted nor rejected. Regions without a planted label are matched
    one-to-one to the reference boxes (``match_pairs``, kinds pooled, every verified box
    taking part); those whose label is their match's are ``unplanted_right``, of which
    ``unplanted_right_accepted`` kept the verdict accurate. Shares with a zero denominator
    are None.
    """
    n = dict.fromkeys(
        (
            "planted",
            "planted_accepted",
            "planted_rejected",
            "planted_restored",
            "planted_unparsed",
            "unplanted_right",
            "unplanted_right_accepted",
        ),
        0,
    )
    for verified, truth in images:
        for r in verified:
            if r["planted_label"] is not None:
                n["planted"] += 1
                n["planted_accepted"] += r["verdict"] == "accurate"
                n["planted_rejected"] += r["correct_generation"] is not None
                n["planted_restored"] += r["verdict"] == "corrected" and _same_label(
                    r["label"], r["original_label"]
                )
                n["planted_unparsed"] += r["verdict"] == "unparsed"
        pairs = match_pairs(
            [r["bbox"] for r in verified], [r["bbox"] for r in truth], iou_threshold
        )
        right = [
            verified[i]
            for i, j in pairs
            if verified[i]["planted_label"] is None
            and _same_label(verified[i]["original_label"], truth[j]["label"])
        ]
        n["unplanted_right"] += len(right)
        n["unplanted_right_accepted"] += sum(r["verdict"] == "accurate" for r in right)
    shares = {
        f"{k}_share": _share(n[k], n["planted"])
        for k in ("planted_accepted", "planted_rejected", "planted_restored", "planted_unparsed")
    }
    return pd.DataFrame(
        [
            {
                "images": len(images),
                "regions": sum(len(v) for v, _ in images),
                **n,
                **shares,
                "unplanted_right_accepted_share": _share(
                    n["unplanted_right_accepted"], n["unplanted_right"]
                ),
                "iou_threshold": iou_threshold,
            }
        ]
    )


def _verified_regions(files: Sequence[Path]) -> dict[str, list[dict]]:
    """key -> the image's rows of the verified region tables (``VERIFIED_COLUMNS``)."""
    by_key: dict[str, list[dict]] = {}
    for path in files:
        for r in pq.read_table(path, columns=VERIFIED_COLUMNS).to_pylist():
            by_key.setdefault(r["key"], []).append(r)
    return by_key


def _release_rows(files: Sequence[Path], keys: list[str]) -> dict[str, dict]:
    """The release rows whose key is in ``keys``: the columns scored against the reference."""
    con = duckdb.connect()
    rows = con.sql(
        "SELECT key, short_caption, scene_status, regions FROM read_parquet($1) "
        "WHERE key IN (SELECT unnest($2))",
        params=[[str(f) for f in files], keys],
    ).to_arrow_table()
    con.close()
    return {r["key"]: r for r in rows.to_pylist()}


def against_reference(
    release_files: Sequence[Path],
    reference: Path,
    *,
    verified_files: Sequence[Path],
    iou_threshold: float = 0.5,
    colours: Collection[str],
) -> dict[str, pd.DataFrame]:
    """The release scored against reference annotations (the demo world): ``region_recall``
    (``score_regions``) and ``scene_captions`` (``scene_caption_scores``); the verified region
    tables ``verified_files``: ``verification`` (``score_verification``).

    A reference image missing from the release counts as all-missed and as without an ok
    caption; release images without a reference are ignored (nothing to score). Verification
    is scored over every verified image, those without a reference for planted labels only.
    """
    ref = pq.read_table(reference, columns=["key", "short_caption", "regions"]).to_pylist()
    release = _release_rows(release_files, [r["key"] for r in ref])
    images = [(release.get(r["key"]), r) for r in ref]
    truth = {r["key"]: r["regions"] for r in ref}
    verified = _verified_regions(verified_files)
    return {
        "region_recall": score_regions(
            [(row and row["regions"], r["regions"]) for row, r in images], iou_threshold
        ),
        "scene_captions": scene_caption_scores(images, colours),
        "verification": score_verification(
            [(regions, truth.get(key, [])) for key, regions in verified.items()], iou_threshold
        ),
    }


# Per stage, the release column that records each row's outcome: (stage, column, unit, table of
# counts from dataset_stats). select_regions' outcome per image is its regions_note, or
# "has regions" when it kept some.
STAGE_COLUMNS = (
    ("caption_scene", "scene_status", "images", "scene_status"),
    ("propose_select_regions", "regions_note", "images", "regions_notes"),
    ("verify_labels", "regions[].label_source", "regions", "label_sources"),
    ("refine_regions", "regions[].caption_source", "regions", "caption_sources"),
)


def stage_outcomes(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows per outcome of each stage's status column in the release, with their share of the
    stage's rows (images or regions), most frequent first."""
    rows = []
    for stage, column, unit, name in STAGE_COLUMNS:
        counts = dict(zip(tables[name].iloc[:, 0].astype(str), tables[name]["count"], strict=True))
        if name == "regions_notes":
            overview = tables["overview"].iloc[0]
            with_regions = int(overview["images"] - overview["images_without_regions"])
            counts = {"has regions": with_regions, **counts} if with_regions else counts
        total = sum(int(v) for v in counts.values())
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        rows += [
            {
                "stage": stage,
                "column": column,
                "unit": unit,
                "outcome": outcome,
                "count": int(n),
                "share": round(int(n) / total, 4),
            }
            for outcome, n in ranked
        ]
    return pd.DataFrame(rows, columns=["stage", "column", "unit", "outcome", "count", "share"])


def _as_dict(table: pd.DataFrame, column: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in zip(table[column], table["count"], strict=True)}


def _optional(value: object) -> object:
    return None if pd.isna(value) else value


def _stage_status(outcomes: pd.DataFrame) -> dict:
    return {
        stage: {
            "column": part["column"].iloc[0],
            "unit": part["unit"].iloc[0],
            "rows": int(part["count"].sum()),
            "counts": dict(zip(part["outcome"], part["count"].astype(int), strict=True)),
            "shares": dict(zip(part["outcome"], part["share"].astype(float), strict=True)),
        }
        for stage, part in outcomes.groupby("stage", sort=False)
    }


def _against_reference(tables: dict[str, pd.DataFrame]) -> dict | None:
    """The figures against the reference, when there is one (the demo world)."""
    if "region_recall" not in tables:
        return None
    regions = tables["region_recall"]
    first = regions.iloc[0]
    return {
        "iou_threshold": float(first["iou_threshold"]),
        "images": int(first["images"]),
        "missing_images": int(first["missing_images"]),
        "regions": {
            row["scope"]: {
                k: _optional(row[k])
                for k in (
                    "reference",
                    "predicted",
                    "matched",
                    "recall",
                    "precision",
                    "labels_correct",
                    "label_accuracy",
                )
            }
            for row in regions.to_dict("records")
        },
        "scene_captions": {
            k: _optional(v) for k, v in tables["scene_captions"].to_dict("records")[0].items()
        },
        "verification": {
            k: _optional(v) for k, v in tables["verification"].to_dict("records")[0].items()
        },
    }


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
        "stage_status": _stage_status(stage_outcomes(tables)),
        "against_reference": _against_reference(tables),
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
    ]:
        lines += [f"## {title}", "", tables[name].to_markdown(index=False), ""]
    outcomes = stage_outcomes(tables)
    lines += [
        "## Outcomes per stage",
        "",
        "Rows (images or regions) per value of each stage's status column in the release.",
        "",
        outcomes.to_markdown(index=False) if len(outcomes) else "No rows.",
        "",
    ]
    if "region_recall" in tables:  # reference annotations exist (the demo world)
        lines += _reference_markdown(tables)
    return "\n".join(lines)


def _ratio(part: int, whole: int) -> str:
    return f"{part} / {whole} ({part / whole:.3f})" if whole else f"{part} / {whole}"


def _reference_markdown(tables: dict[str, pd.DataFrame]) -> list[str]:
    regions = tables["region_recall"]
    scene = tables["scene_captions"].to_dict("records")[0]
    iou_threshold = regions["iou_threshold"].iloc[0]
    shown = regions[["scope", "reference", "predicted", "matched"]].assign(
        **{
            c: [("n/a" if pd.isna(v) else f"{v:.3f}") for v in regions[c]]
            for c in ("recall", "precision", "label_accuracy")
        }
    )

    def ceiling(key: str) -> str:
        value = _optional(scene[key])
        return "n/a" if value is None else f"{value:.3f}"

    return [
        "## Against the reference annotations",
        "",
        f"Regions matched one-to-one at IoU >= {iou_threshold:g}; label accuracy is over "
        f"matched regions ({regions['images'].iloc[0]} reference images, "
        f"{regions['missing_images'].iloc[0]} missing from the release).",
        "",
        shown.to_markdown(index=False, disable_numparse=True),
        "",
        "Short scene captions: objects are the reference's foreground regions, in images whose "
        "short caption is ok; the last column scores the reference's own short caption.",
        "",
        "| measure | release | reference caption |",
        "| --- | --- | --- |",
        f"| images with an ok short caption | {_ratio(scene['ok_captions'], scene['images'])} | |",
        f"| objects named | {_ratio(scene['objects_named'], scene['objects'])} "
        f"| {ceiling('name_share_reference')} |",
        f"| object colours named | {_ratio(scene['colours_named'], scene['objects'])} "
        f"| {ceiling('colour_share_reference')} |",
        "",
        *_verification_markdown(tables["verification"].to_dict("records")[0]),
    ]


def _verification_markdown(v: dict) -> list[str]:
    planted = v["planted"]
    return [
        "Label verification on labels known wrong: regions shown a deliberately wrong label "
        "(verify_labels.plant_wrong; rejected: the model answered no; restored: its correction "
        "is the label before planting); and on labels known right: unplanted regions matched "
        f"to a reference region (IoU >= {v['iou_threshold']:g}) whose label they carry.",
        "",
        "| measure | regions |",
        "| --- | --- |",
        f"| planted labels rejected | {_ratio(v['planted_rejected'], planted)} |",
        f"| planted labels restored | {_ratio(v['planted_restored'], planted)} |",
        f"| planted labels unparsed | {_ratio(v['planted_unparsed'], planted)} |",
        f"| planted labels accepted | {_ratio(v['planted_accepted'], planted)} |",
        "| right labels accepted | "
        f"{_ratio(v['unplanted_right_accepted'], v['unplanted_right'])} |",
        "",
    ]


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

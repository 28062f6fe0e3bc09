"""Schemas of the per-shard region tables; each stage adds columns to the previous one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: Columns of ``results/regions/proposals/{shard}.parquet``: one row per proposed region.
PROPOSAL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.string()),
        ("bbox", pa.list_(pa.float64())),
        ("score", pa.float64()),
        ("kind", pa.string()),  # foreground | background
        ("source", pa.string()),  # detector | sam_auto
        ("mask_area", pa.float64()),
        ("query_source", pa.string()),  # caption | vocabulary
    ]
)


def _extend(schema: pa.Schema, *fields: tuple[str, pa.DataType]) -> pa.Schema:
    for name, dtype in fields:
        schema = schema.append(pa.field(name, dtype))
    return schema


SELECTED_SCHEMA = _extend(PROPOSAL_SCHEMA, ("rank", pa.int32()))
VERIFIED_SCHEMA = _extend(
    SELECTED_SCHEMA,
    ("original_label", pa.string()),  # the detector's
    # the wrong label shown instead (verify_labels.plant_wrong); null when none was planted
    ("planted_label", pa.string()),
    ("verdict", pa.string()),  # accurate | corrected | unparsed
    ("p_accurate", pa.float64()),  # P(yes) / (P(yes) + P(no)); null when both are 0
    ("verify_reason", pa.string()),  # why unparsed
    # JSON of the correction's decoding, when one was asked (the label was rejected)
    ("correct_generation", pa.string()),
)
CAPTIONED_SCHEMA = _extend(
    VERIFIED_SCHEMA,
    ("raw_caption", pa.string()),
    ("caption_status", pa.string()),  # ok | unparsed | truncated | repetitive
    ("caption_reason", pa.string()),
    ("caption_model_output", pa.string()),  # kept only when not ok
    ("caption_generation", pa.string()),  # JSON of the effective decoding values
)
REFINED_SCHEMA = _extend(
    CAPTIONED_SCHEMA,
    ("caption", pa.string()),
    ("refine_path", pa.string()),  # llm | fallback | failed
    ("refine_reason", pa.string()),
    ("refine_generation", pa.string()),  # JSON of the LLM's decoding, when it was asked
)


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)


def write_rows(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    pq.write_table(_table(rows, schema), path, compression="zstd")


def image_groups(path: Path, batch_rows: int = 1024) -> Iterator[list[dict]]:
    """The rows of a region table, one list per image, read ``batch_rows`` rows at a time.

    Region stages write an image's rows together, one image after another, so this holds one
    batch and one image rather than the shard. An image whose rows come back after another
    image's is an error: its regions would be handled as two images."""
    done: set[str] = set()
    group: list[dict] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            if group and row["key"] != group[0]["key"]:
                done.add(group[0]["key"])
                yield group
                group = []
            if row["key"] in done:
                raise ValueError(f"{path}: the rows of image {row['key']} are not together")
            group.append(row)
    if group:
        yield group


def write_groups(
    groups: Iterable[list[dict]], schema: pa.Schema, path: Path, group_rows: int = 1024
) -> tuple[int, int]:
    """Write lists of rows as they come, a Parquet row group per ``group_rows`` rows, so only
    that many are held; returns (lists, rows) written."""
    lists = rows = 0
    pending: list[dict] = []
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for group in groups:
            lists += 1
            pending += group
            if len(pending) >= group_rows:
                writer.write_table(_table(pending, schema))
                rows, pending = rows + len(pending), []
        writer.write_table(_table(pending, schema))  # the rest; an empty table writes no rows
    return lists, rows + len(pending)


def image_sizes(status: Path) -> dict[str, dict]:
    """key -> stored and original size, from a download status table."""
    columns = ["key", "width", "height", "original_width", "original_height"]
    return {r["key"]: r for r in pq.read_table(status, columns=columns).to_pylist()}


def check_complete(before: list[dict], after: list[dict], stage: str) -> None:
    """A stage returns exactly one row per region it was given; the error names the images
    whose regions went missing."""
    if len(before) != len(after):
        lost = sorted({r["key"] for r in before} - {r["key"] for r in after})
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        raise RuntimeError(
            f"{stage}: {len(before)} regions in, {len(after)} out (images without their "
            f"regions: {shown or 'none; rows were duplicated'}); an image in the tar may no "
            "longer decode (re-run download for this shard)"
        )

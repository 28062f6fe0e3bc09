"""Schemas of the per-shard region tables; each stage adds columns to the previous one."""

from __future__ import annotations

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
    ("original_label", pa.string()),
    ("verdict", pa.string()),  # accurate | corrected | unparsed
    ("p_accurate", pa.float64()),
)
CAPTIONED_SCHEMA = _extend(
    VERIFIED_SCHEMA,
    ("raw_caption", pa.string()),
    ("caption_status", pa.string()),  # ok | unparsed
    ("caption_reason", pa.string()),
    ("caption_model_output", pa.string()),  # kept only when it did not parse
)
REFINED_SCHEMA = _extend(
    CAPTIONED_SCHEMA,
    ("caption", pa.string()),
    ("refine_path", pa.string()),  # llm | fallback | failed
    ("refine_reason", pa.string()),
)


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def write_rows(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    pq.write_table(table, path, compression="zstd")


def image_sizes(status: Path) -> dict[str, dict]:
    """key -> stored and original size, from a download status table."""
    columns = ["key", "width", "height", "original_width", "original_height"]
    return {r["key"]: r for r in pq.read_table(status, columns=columns).to_pylist()}


def check_complete(before: list[dict], after: list[dict], stage: str) -> None:
    """A stage returns exactly one row per region it was given."""
    if len(before) != len(after):
        raise RuntimeError(
            f"{stage}: {len(before)} regions in, {len(after)} out; an image in the tar "
            "may no longer decode (re-run download for this shard)"
        )

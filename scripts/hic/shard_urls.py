"""Validate, deduplicate and shard LAION-style URL lists.

Keys and shards come from the URL itself: ``key`` is the first 16 hex digits of
md5(url) and the shard is the key's leading 32 bits modulo the shard count. So a
URL keeps its key whatever else is in the list, duplicates always meet in one
shard, and one streaming pass (DuckDB, spilling to disk) handles 12M rows.

The shard count is fixed before any row is read (Snakemake builds the DAG from
it): ``ceil(rows / shard_size)`` where ``rows`` comes from parquet metadata or a
newline count of csv/tsv files (see :func:`count_rows`). Shard sizes therefore
vary around ``shard_size`` by a few percent.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from hic.duck import connect

#: Columns of every ``results/urls/{shard}.parquet``.
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)

#: Columns of ``results/urls/rejected.parquet``: every input row that is not in a shard.
REJECTED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)

#: Target column -> LAION-style names tried in order (config may override).
DEFAULT_COLUMNS: dict[str, list[str]] = {
    "url": ["url", "URL"],
    "caption": ["caption", "TEXT", "text"],
    "width": ["width", "WIDTH"],
    "height": ["height", "HEIGHT"],
}

_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


class UrlListError(ValueError):
    """A URL list that cannot be read as configured."""


# Leading and trailing ASCII whitespace is not part of a URL; Python (hic.url_keys) and DuckDB
# strip the same characters (DuckDB's trim() would keep tabs).
_STRIP_SQL = r"regexp_replace(url, '^[ \t\n\r\f\v]+|[ \t\n\r\f\v]+$', '', 'g')"


def shard_of(key: str, n_shards: int) -> int:
    return int(key[:8], 16) % n_shards


def shard_name(index: int) -> str:
    return f"{index:05d}"


def list_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise UrlListError(
            f"{path}: unsupported URL list extension {suffix!r}; use one of {sorted(_FORMATS)}"
        )
    return _FORMATS[suffix]


def count_rows(path: Path) -> int:
    """Rows in a URL list without parsing it: parquet metadata, or newlines minus the header.

    For csv/tsv a caption with embedded newlines makes this an overestimate, which only
    makes shards slightly smaller than configured.
    """
    if list_format(path) == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as err:
            raise UrlListError(f"{path}: not a readable parquet file ({err})") from err
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"  # final line without newline
    return max(lines - 1, 0)


def shard_count(n_rows: int, shard_size: int) -> int:
    return max(1, math.ceil(n_rows / shard_size))


def resolve_columns(
    available: Sequence[str], candidates: Mapping[str, Sequence[str]], path: Path
) -> dict[str, str | None]:
    """Map target names to the file's column names; ``url`` is required."""
    found: dict[str, str | None] = {}
    for target, names in candidates.items():
        found[target] = next((n for n in names if n in available), None)
    if found.get("url") is None:
        raise UrlListError(
            f"{path}: no URL column; looked for {list(candidates['url'])}, "
            f"found columns {list(available)}. Set shard_urls.columns.url in the config."
        )
    return found


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _text_dialect(path: Path) -> tuple[str, str]:
    """(delimiter, quote) of a csv or tsv list: tsv has no quoting (a caption may open with a
    lone '"'), csv quotes with '"'."""
    return ("\t", "") if list_format(path) == "tsv" else (",", '"')


def _text_header(path: Path) -> list[str]:
    delim, quote = _text_dialect(path)
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        if quote:
            return next(csv.reader(f, delimiter=delim, quotechar=quote), [])
        return next(csv.reader(f, delimiter=delim, quoting=csv.QUOTE_NONE), [])


def _scan_sql(path: Path, header: list[str], rejects: str) -> str:
    """A DuckDB scan of one list. csv/tsv are read with the header's columns as text (widths
    and heights are cast later, bad values become NULL) and without dialect sniffing, which
    would fail the whole file on one malformed row; such rows go to table ``rejects``."""
    p = _sql_text(str(path))
    if list_format(path) == "parquet":
        return f"read_parquet({p}, file_row_number = true)"
    delim, quote = _text_dialect(path)
    columns = "{" + ", ".join(f"{_sql_text(c)}: 'VARCHAR'" for c in header) + "}"
    return (
        f"read_csv({p}, delim = {_sql_text(delim)}, quote = {_sql_text(quote)}, "
        f"escape = {_sql_text(quote)}, header = true, columns = {columns}, "
        f"auto_detect = false, store_rejects = true, rejects_table = '{rejects}', "
        f"rejects_scan = '{rejects}_scans')"
    )


def _column_sql(name: str | None, cast: str) -> str:
    # Unparseable widths/heights become NULL rather than failing the whole list.
    return f'TRY_CAST("{name}" AS {cast})' if name else f"NULL::{cast}"


def _load(con: duckdb.DuckDBPyConnection, paths: Sequence[Path], columns: Mapping) -> None:
    con.execute(
        "CREATE TABLE raw (file_index INTEGER, source_file VARCHAR, source_row BIGINT, "
        "url VARCHAR, caption VARCHAR, width BIGINT, height BIGINT, unparsed BOOLEAN)"
    )
    for index, path in enumerate(paths):
        if not path.exists():
            raise UrlListError(f"{path}: URL list not found")
        text = list_format(path) != "parquet"
        header = _text_header(path) if text else []
        rejects = f"rejects_{index}"
        scan = _scan_sql(path, header, rejects)
        if text:
            available = header
        else:
            available = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()]
        cols = resolve_columns(available, columns, path)
        url, caption, width, height = (
            _column_sql(cols[t], c)
            for t, c in [
                ("url", "VARCHAR"),
                ("caption", "VARCHAR"),
                ("width", "BIGINT"),
                ("height", "BIGINT"),
            ]
        )
        # csv has no file_row_number; DuckDB keeps insertion order for a plain scan, so a
        # csv row's source_row counts the rows that parsed before it.
        row = "row_number() OVER () - 1" if text else "file_row_number"
        con.execute(
            f"INSERT INTO raw SELECT {index}, ?, {row}, {url}, {caption}, {width}, {height}, "
            f"false FROM {scan}",
            [str(path)],
        )
        if text:  # malformed rows: kept as rejected, with their line number and text
            con.execute(
                f"INSERT INTO raw SELECT {index}, ?, NULL, NULL, "
                f"'line ' || line || ': ' || any_value(csv_line), NULL, NULL, true "
                f"FROM {rejects} GROUP BY line ORDER BY line",
                [str(path)],
            )


def _write(con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema, path: Path) -> None:
    # Through Arrow with an explicit schema: DuckDB marks null-free columns "not null",
    # which would give shards of one list different schemas.
    pq.write_table(con.sql(query).to_arrow_table().cast(schema), path, compression="zstd")


def shard_url_lists(
    paths: Sequence[Path],
    out_dir: Path,
    n_shards: int,
    *,
    schemes: Sequence[str] = ("http", "https"),
    columns: Mapping[str, Sequence[str]] = DEFAULT_COLUMNS,
    temp_dir: Path | None = None,
    threads: int | None = None,
    memory_mb: int | None = None,
) -> dict:
    """Write ``out_dir/{shard}.parquet`` for every shard, ``rejected.parquet`` and return a summary.

    A row is rejected (kept, with a reason) when it does not parse (csv/tsv; its caption
    holds "line N: <text>"), its url is empty, has no ``scheme:`` or a scheme not in
    ``schemes``, or repeats an earlier url (the first occurrence, in file then row order, is
    kept). ``temp_dir`` holds DuckDB's database so large lists spill to disk; ``threads`` and
    ``memory_mb`` bound DuckDB to the job's allocation (``hic.duck``).
    """
    paths = [Path(p) for p in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    db = ":memory:"
    if temp_dir:
        temp_dir.mkdir(parents=True, exist_ok=True)
        db = str(temp_dir / "shard_urls.duckdb")
        Path(db).unlink(missing_ok=True)
    con = connect(db, threads=threads, memory_mb=memory_mb)
    try:
        _load(con, paths, {**DEFAULT_COLUMNS, **columns})
        con.execute(
            f"""
            CREATE TABLE classified AS
            SELECT *,
              CASE
                WHEN unparsed THEN 'unparseable_row'
                WHEN url IS NULL OR url = '' THEN 'empty_url'
                WHEN NOT regexp_matches(url, '^[A-Za-z][A-Za-z0-9+.-]*:') THEN 'no_scheme'
                WHEN NOT list_contains(?, lower(regexp_extract(url, '^([^:]+):', 1)))
                  THEN 'unsupported_scheme'
                WHEN occurrence > 1 THEN 'duplicate_url'
              END AS reason,
              ('0x' || substr(key, 1, 8))::UBIGINT % {int(n_shards)} AS shard
            FROM (
              SELECT *, substr(md5(url), 1, 16) AS key,
                row_number() OVER (PARTITION BY url ORDER BY file_index, source_row)
                  AS occurrence
              FROM (SELECT * REPLACE ({_STRIP_SQL} AS url) FROM raw)
            )
            ORDER BY shard, file_index, source_row
            """,
            [[s.lower() for s in schemes]],
        )
        collisions = con.execute(
            "SELECT key, count(DISTINCT url) FROM classified WHERE reason IS NULL "
            "GROUP BY key HAVING count(DISTINCT url) > 1 LIMIT 5"
        ).fetchall()
        if collisions:  # 64-bit keys: not expected below billions of URLs
            raise UrlListError(f"distinct URLs share a key: {collisions}")

        for shard in range(n_shards):
            _write(
                con,
                f"SELECT {', '.join(SHARD_SCHEMA.names)} FROM classified "
                f"WHERE reason IS NULL AND shard = {shard} ORDER BY file_index, source_row",
                SHARD_SCHEMA,
                out_dir / f"{shard_name(shard)}.parquet",
            )
        _write(
            con,
            "SELECT source_file, source_row, url, caption, reason, "
            "CASE WHEN reason = 'duplicate_url' THEN key END AS duplicate_of "
            "FROM classified WHERE reason IS NOT NULL ORDER BY file_index, source_row",
            REJECTED_SCHEMA,
            out_dir / "rejected.parquet",
        )
        rejected = dict(
            con.execute(
                "SELECT reason, count(*) FROM classified WHERE reason IS NOT NULL "
                "GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
        per_file = dict(
            con.execute("SELECT source_file, count(*) FROM raw GROUP BY 1 ORDER BY 1").fetchall()
        )
        sizes = dict(
            con.execute(
                "SELECT shard, count(*) FROM classified WHERE reason IS NULL GROUP BY 1"
            ).fetchall()
        )
    finally:
        con.close()
        if temp_dir:
            Path(db).unlink(missing_ok=True)
    rows = [sizes.get(s, 0) for s in range(n_shards)]
    return {
        "input_rows": sum(per_file.values()),
        "input_rows_per_file": per_file,
        "rejected": rejected,
        "sharded_rows": sum(rows),
        "n_shards": n_shards,
        "shard_rows_min": min(rows),
        "shard_rows_max": max(rows),
        "schemes": list(schemes),
    }


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

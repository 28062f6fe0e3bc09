"""Global statistics of the download shards, aggregated with DuckDB.

Per-row measures (error type, alt-text word count) are computed once per shard by the
download stage, so this stage only groups and counts: at 12M rows it reads a few
integer columns, never the captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hic.duck import connect  # noqa: E402

SIZE_COLUMNS = ["width", "height", "original_width", "original_height"]


def _scan(paths: Sequence[Path]) -> str:
    files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
    return f"read_parquet([{files}])"


def quantile_table(
    con: duckdb.DuckDBPyConnection, source: str, columns: Sequence[str], quantiles: Sequence[float]
) -> pd.DataFrame:
    """One row per column: n, min, exact (discrete) quantiles, max, mean; nulls ignored."""
    parts = []
    for c in columns:
        qs = ", ".join(f'quantile_disc("{c}", {q}) AS "q{q:g}"' for q in quantiles)
        parts.append(
            f'SELECT \'{c}\' AS measure, count("{c}") AS n, min("{c}") AS min, {qs}, '
            f'max("{c}") AS max, round(avg("{c}"), 2) AS mean FROM {source}'
        )
    return con.execute(" UNION ALL ".join(parts)).df()


def _fold_tail(errors: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ``top`` most frequent error types, the rest summed into one "other (k types)" row,
    so the table still accounts for every failure."""
    if len(errors) <= top:
        return errors
    head, tail = errors.iloc[:top], errors.iloc[top:]
    other = {
        "error_type": f"other ({len(tail)} types)",
        "count": int(tail["count"].sum()),
        "fraction_of_failures": round(float(tail["fraction_of_failures"].sum()), 4),
        "example": tail["example"].iloc[0],
    }
    return pd.concat([head, pd.DataFrame([other])], ignore_index=True)


def download_stats(
    status_files: Sequence[Path],
    *,
    quantiles: Sequence[float],
    top_errors: int,
    threads: int | None = None,
    memory_mb: int | None = None,
) -> dict[str, pd.DataFrame]:
    """Tables over all shards' status parquet files (see ``hic.download.STATUS_SCHEMA``);
    DuckDB is bounded to ``threads`` and ``memory_mb`` (``hic.duck``)."""
    con = connect(threads=threads, memory_mb=memory_mb)
    con.execute(f"CREATE VIEW s AS SELECT * FROM {_scan(status_files)}")
    tables = {
        "status": con.execute(
            "SELECT status, count(*) AS count, round(count(*) / sum(count(*)) OVER (), 4) "
            "AS fraction FROM s GROUP BY status ORDER BY count DESC, status"
        ).df(),
        "errors": _fold_tail(
            con.execute(
                "SELECT error_type, count(*) AS count, "
                "round(count(*) / sum(count(*)) OVER (), 4) AS fraction_of_failures, "
                "min(error_message) AS example FROM s WHERE error_type IS NOT NULL "
                "GROUP BY error_type ORDER BY count DESC, error_type"
            ).df(),
            top_errors,
        ),
        "image_sizes": quantile_table(
            con, "(SELECT * FROM s WHERE status = 'success')", SIZE_COLUMNS, quantiles
        ),
        "alt_text_words": quantile_table(con, "s", ["caption_words"], quantiles),
        "alt_text_words_histogram": con.execute(
            "SELECT caption_words AS words, count(*) AS count FROM s GROUP BY 1 ORDER BY 1"
        ).df(),
        "image_size_histogram": con.execute(
            "SELECT width, height, count(*) AS count FROM s WHERE status = 'success' "
            "GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2"
        ).df(),
    }
    con.close()
    return tables


def summary_markdown(tables: dict[str, pd.DataFrame], urls: dict) -> str:
    status = tables["status"]
    total = int(status["count"].sum())
    ok = int(status.loc[status["status"] == "success", "count"].sum())
    rejected = urls.get("rejected", {})
    reasons = ", ".join(f"{k}: {v}" for k, v in rejected.items()) or "none"
    lines = [
        "# Download statistics",
        "",
        f"- URL rows read: {urls.get('input_rows', 'n/a')}; rejected before download: "
        f"{sum(rejected.values())} ({reasons})",
        f"- URLs attempted: {total} in {urls.get('n_shards', 'n/a')} shards",
        f"- Downloaded: {ok} ({ok / total:.1%})" if total else "- Downloaded: 0",
        "",
    ]
    for name, title in [
        ("status", "Status"),
        ("errors", "Failures by type"),
        ("image_sizes", "Image sizes (successful downloads, pixels)"),
        ("alt_text_words", "Alt-text length (words)"),
    ]:
        lines += [f"## {title}", "", tables[name].to_markdown(index=False), ""]
    return "\n".join(lines)


def plot_status(tables: dict[str, pd.DataFrame], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    status, errors = tables["status"], tables["errors"]
    axes[0].barh(status["status"], status["count"], color="tab:blue")
    axes[0].set_title("Download status")
    axes[1].barh(errors["error_type"], errors["count"], color="tab:red")
    axes[1].set_title("Failures by type")
    for ax in axes:
        ax.invert_yaxis()
        ax.set_xlabel("URLs")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distributions(tables: dict[str, pd.DataFrame], path: Path, bins: int) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), layout="constrained")
    words = tables["alt_text_words_histogram"]
    axes[0].hist(words["words"], bins=bins, weights=words["count"], color="tab:green")
    axes[0].set(title="Alt-text length", xlabel="words", ylabel="URLs")
    sizes = tables["image_size_histogram"]
    for ax, col in zip(axes[1:], ["width", "height"], strict=True):
        ax.hist(sizes[col], bins=bins, weights=sizes["count"], color="tab:purple")
        ax.set(title=f"Stored image {col}", xlabel="pixels", ylabel="images")
    fig.savefig(path, dpi=120)
    plt.close(fig)

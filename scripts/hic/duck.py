"""DuckDB connections sized to the job that opens them.

Left alone, DuckDB uses every core of the node and 80% of its memory: on a shared cluster node
that oversubscribes the cores and can exceed the job's memory allocation, and the scheduler
kills the job. Stages pass their Snakemake ``threads`` and ``mem_mb`` instead.
"""

from __future__ import annotations

import duckdb


def connect(
    database: str = ":memory:", *, threads: int | None = None, memory_mb: int | None = None
) -> duckdb.DuckDBPyConnection:
    """A connection limited to ``threads`` and to 80% of ``memory_mb`` (the rest is Python's);
    beyond that limit DuckDB spills to its temporary directory instead of growing."""
    config = {}
    if threads:
        config["threads"] = int(threads)
    if memory_mb:
        config["memory_limit"] = f"{int(memory_mb * 0.8)}MB"
    return duckdb.connect(database, config=config)

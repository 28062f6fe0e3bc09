"""Retry the transient download failures of a finished run, and only those.

A crawl of millions of URLs always ends with some timeouts, 5xx answers and dropped
connections that a later attempt would get. ``retry_shard`` downloads just those URLs of a
finished shard again (with the run's own download settings), merges the new successes into
the shard's tar (key order, as ``download`` writes it) and updates their rows of the status
table and the stats file, each replaced whole. Successes are never fetched again. A shard
that gained images has newer download outputs, so the next ``snakemake`` run re-runs the later
stages of exactly those shards; ``download`` itself is not re-run.

    make retry-downloads                 # every shard of results/images, config.yaml's settings
    PYTHONPATH=scripts python -m hic.retry_downloads --help
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from hic.download import STATUS_SCHEMA, DownloadSettings, fetch_rows

log = logging.getLogger(__name__)

#: Error types (hic.download.error_type) a later attempt may well get: the server or the
#: network failed, not the URL. 404s, decode errors and opt-outs are final.
TRANSIENT = re.compile(
    r"timeout|http_5\d\d|http_429|http_408|connection_closed|connection_refused|dns"
)
RETRIES_KEY = b"hic.retries"


def transient(status: pa.Table, pattern: re.Pattern = TRANSIENT) -> list[int]:
    """Row indices of ``status`` that failed to download for a transient reason."""
    return [
        i
        for i, (s, t) in enumerate(
            zip(status["status"].to_pylist(), status["error_type"].to_pylist(), strict=True)
        )
        if s == "failed_to_download" and t and pattern.fullmatch(t)
    ]


def merge_tars(old: Path, new: Path, out: Path, replaced: set[str]) -> int:
    """Members of ``old`` (less the keys in ``replaced``) and ``new``, in key order, into
    ``out``; returns the number of samples. Both inputs are key-ordered tars; members are read
    by offset, so memory holds one file at a time."""
    with tarfile.open(old) as a, tarfile.open(new) as b, tarfile.open(out, "w") as dst:
        members = [(m.name, a, m) for m in a if m.name.partition(".")[0] not in replaced]
        members += [(m.name, b, m) for m in b]
        members.sort(key=lambda item: (item[0].partition(".")[0], item[0]))
        for _, src, member in members:
            dst.addfile(member, src.extractfile(member))
        return len({name.partition(".")[0] for name, _, _ in members})


def retry_shard(
    tar: Path,
    status: Path,
    stats: Path,
    settings: DownloadSettings,
    work_dir: Path,
    pattern: re.Pattern = TRANSIENT,
) -> dict:
    """Download the transient failures of one finished shard again; returns a summary."""
    table = pq.read_table(status)
    rows = transient(table, pattern)
    summary = {"shard": status.stem, "retried": len(rows), "recovered": 0}
    if not rows:
        return summary  # untouched: no later stage re-runs for this shard
    retry = table.take(pa.array(rows))
    expected = pa.table({"key": retry["key"], "url": retry["url"], "caption": retry["caption"]})
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        new_tar = work_dir / "retried.tar"
        new_status, _ = fetch_rows(expected, new_tar, settings, work_dir)
        recovered = pc.sum(pc.equal(new_status["status"], "success")).as_py() or 0
        summary["recovered"] = recovered
        if not recovered:
            return summary  # nothing gained: leave the shard as it was
        by_key = {r["key"]: r for r in new_status.to_pylist()}
        merged = [by_key.get(r["key"], r) for r in table.select(STATUS_SCHEMA.names).to_pylist()]
        merged_table = pa.Table.from_pylist(merged, schema=STATUS_SCHEMA)
        metadata = dict(table.schema.metadata or {})
        history = json.loads(metadata.get(RETRIES_KEY, b"[]"))
        history.append({"at": datetime.now(UTC).isoformat(timespec="seconds"), **summary})
        metadata[RETRIES_KEY] = json.dumps(history).encode()
        tmp_tar, tmp_status = work_dir / "merged.tar", work_dir / "merged.parquet"
        n_tar = merge_tars(tar, new_tar, tmp_tar, set(by_key))
        pq.write_table(
            merged_table.replace_schema_metadata(metadata), tmp_status, compression="zstd"
        )
        counts = pc.value_counts(merged_table["status"]).to_pylist()
        shard_stats = json.loads(stats.read_text()) if stats.exists() else {}
        shard_stats.update(
            count=merged_table.num_rows,
            status={c["values"]: c["counts"] for c in counts},
            samples_in_tar=n_tar,
            retries=history,
        )
        # The tar first: a kill before the status table is replaced leaves extra images that
        # the status table does not list (the stages log and skip them), never missing ones.
        _replace(tmp_tar, tar)
        _replace(tmp_status, status)
        stats.write_text(json.dumps(shard_stats, indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return summary


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` (possibly on another file system) over ``dst`` in one atomic rename."""
    staged = dst.with_name(dst.name + ".retry")
    shutil.move(src, staged)
    os.replace(staged, dst)


def download_settings(config_files: list[Path], schema: Path) -> DownloadSettings:
    """The ``download`` settings of the workflow config files (later files win), validated
    and completed with the schema's defaults exactly as the workflow does."""
    from snakemake.utils import update_config, validate

    config: dict = {}
    for path in config_files:
        update_config(config, yaml.safe_load(path.read_text()) or {})
    validate(config, str(schema))
    section = config["download"]
    return DownloadSettings(**{f.name: section[f.name] for f in fields(DownloadSettings)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=Path("results/images"))
    parser.add_argument(
        "--configfile",
        type=Path,
        nargs="+",
        default=[Path("config.yaml")],
        help="the workflow config file(s) the run used (their download settings apply)",
    )
    parser.add_argument("--schema", type=Path, default=Path("schemas/config.schema.yaml"))
    parser.add_argument(
        "--types",
        default=TRANSIENT.pattern,
        help="regular expression of the error types to retry (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    settings = download_settings(args.configfile, args.schema)
    shards = sorted(p for p in args.images.glob("[0-9]*.parquet"))
    if not shards:
        raise SystemExit(f"no download shards in {args.images}: run the workflow first")
    totals = {"retried": 0, "recovered": 0}
    for status in shards:
        tar = status.with_suffix(".tar")
        stats = status.with_name(f"{status.stem}_stats.json")
        work = Path(tempfile.mkdtemp(prefix=f"hic-retry-{status.stem}-"))
        summary = retry_shard(tar, status, stats, settings, work, re.compile(args.types))
        if summary["retried"]:
            log.info("%s", summary)
        for k in totals:
            totals[k] += summary[k]
    log.info("retried %(retried)d transient failures, recovered %(recovered)d", totals)
    log.info("settings: %s", asdict(settings))
    return 0


if __name__ == "__main__":  # img2dataset's spawned workers re-import this module
    sys.exit(main())

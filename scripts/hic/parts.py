"""Resumable shard jobs: finished rows flushed in parts, reused only by the same job.

A long GPU stage maps a batch function over ordered work units (images or regions). Every
``flush_every`` batches the rows of the units finished since the last flush go to
``<out>.parts/part-NNNNN.parquet`` (written aside, then renamed: a kill leaves a whole part or
none), with each unit's id and row count in the part's metadata, so a unit that yields no row
(an image without proposals) is known to be done as well. The folder's manifest holds the job's
fingerprint (what decides its rows: settings, models, prompt texts, backend, the inputs'
identity) and the row schema; a restarted job keeps the parts only when both match, processes
the remaining units alone and gets every row back in unit order.

Units are processed in order and parts end on batch boundaries, so the flushed units are a
prefix of the order and the rest batch exactly as they would have in one uninterrupted run:
with a deterministic batch function the rows, and the files made from them, are the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

U = TypeVar("U")

#: Settings that change how fast rows come, not which rows: parts made under another value
#: are kept (the rows may differ only by the numerics of another batch composition).
SPEED_SETTINGS = frozenset({"batch_size"})


def batches(items: Iterable, size: int, drop_last: bool = False) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


def fingerprint(*values) -> str:
    """A hash of JSON-serialisable values (dicts in any key order hash alike)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def file_identity(paths: Iterable[Path]) -> list[list]:
    """Path, size and modification time of each file: it changes when Snakemake rewrites an
    input, and costs no read of the data."""
    identity = []
    for path in map(Path, paths):
        stat = path.stat()
        identity.append([str(path), stat.st_size, stat.st_mtime_ns])
    return identity


def model_identity(ref: dict) -> dict:
    """A model reference (id, revision, ...), with the folder's identity when the id is a local
    folder: one the workflow builds may be built again under the same name."""
    folder = Path(ref["id"])
    return {**ref, "folder": file_identity([folder])[0] if folder.is_dir() else None}


def settings_identity(settings) -> dict:
    """A settings dataclass as a dict, without the settings that only change speed."""
    return {k: v for k, v in asdict(settings).items() if k not in SPEED_SETTINGS}


class PartStore:
    """Flushed rows of an unfinished job, valid only for one fingerprint and schema."""

    def __init__(self, folder: Path, fingerprint: str, schema: pa.Schema):
        self.folder, self.schema = folder, schema
        manifest = folder / "manifest.json"
        wanted = json.dumps({"fingerprint": fingerprint, "schema": schema.to_string()})
        if folder.exists() and _read_text(manifest) != wanted:
            # Another job's parts, or a manifest torn by a kill: neither can be trusted.
            log.info("discarding parts of another job in %s", folder)
            shutil.rmtree(folder)
        if not manifest.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(wanted)
            os.replace(tmp, manifest)

    @classmethod
    def beside(cls, out: Path, fingerprint: str, schema: pa.Schema) -> PartStore:
        """The store of the job writing ``out``: ``<out>.parts/``."""
        return cls(out.with_name(out.name + ".parts"), fingerprint, schema)

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def units(self) -> list[tuple[Hashable, int]]:
        """(unit id, row count) of every flushed unit, in the order they were processed."""
        return [
            tuple(u) for p in self.parts() for u in json.loads(pq.read_schema(p).metadata[b"units"])
        ]

    def read(self) -> pa.Table:
        tables = [pq.read_table(p).replace_schema_metadata(None) for p in self.parts()]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def write(self, units: list[tuple[Hashable, int]], rows: list[dict]) -> None:
        if sum(n for _, n in units) != len(rows):
            raise ValueError(f"{len(rows)} rows for units that count {units}")
        table = pa.Table.from_pylist(rows, schema=self.schema)
        table = table.replace_schema_metadata({"units": json.dumps(units)})
        path = self.folder / f"part-{len(self.parts()):05d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def remove(self) -> None:
        """Called once the job's output is written: the parts are then redundant."""
        shutil.rmtree(self.folder)


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


@dataclass(frozen=True)
class Mapped:
    """Every unit's rows, flushed earlier or now, in unit order."""

    units: list[Hashable]  # unit ids, in order
    rows: list[dict]  # their rows, unit after unit
    resumed_units: int  # units read back from an earlier run's parts
    resumed_rows: int


#: Environment variable: seconds a job waits after each flush (default none). Only the workflow's
#: kill-and-resume test sets it, so that a SIGKILL sent when a part appears lands inside the
#: job that flushed it, not after the job has finished.
FLUSH_PAUSE = "HIC_FLUSH_PAUSE"


def _pause_after_flush() -> None:
    if seconds := float(os.environ.get(FLUSH_PAUSE) or 0):
        time.sleep(seconds)


def resumable_map(
    store: PartStore,
    pending: Callable[[set], Iterable[U]],
    unit_id: Callable[[U], Hashable],
    process: Callable[[list[U]], Sequence[list[dict]]],
    batch_size: int,
    flush_every: int,
) -> Mapped:
    """Map ``process`` over batches of units, flushing to ``store`` every ``flush_every``
    batches and skipping the units an earlier run flushed.

    ``pending(done)`` gives the units in order; it may leave out those whose ids are in ``done``
    (so a finished image is not even decoded again), and any it does give are skipped.
    ``process`` returns one list of rows per unit of its batch. Unit ids are strings or ints
    (they are stored as JSON).
    """
    if flush_every < 1 or batch_size < 1:
        raise ValueError(f"flush_every and batch_size must be >= 1: {flush_every}, {batch_size}")
    flushed = store.units()
    done = {u for u, _ in flushed}
    resumed_rows = sum(n for _, n in flushed)
    if flushed:
        log.info(
            "resuming from %d parts: %d units (%d rows) already done",
            len(store.parts()),
            len(flushed),
            resumed_rows,
        )
    units: list[tuple[Hashable, int]] = []
    rows: list[dict] = []
    todo = (u for u in pending(done) if unit_id(u) not in done)
    for n, batch in enumerate(batches(todo, batch_size), start=1):
        per_unit = process(batch)
        if len(per_unit) != len(batch):
            raise ValueError(f"{len(per_unit)} row lists for a batch of {len(batch)} units")
        units += [(unit_id(u), len(r)) for u, r in zip(batch, per_unit, strict=True)]
        rows += [row for unit_rows in per_unit for row in unit_rows]
        if n % flush_every == 0:
            store.write(units, rows)
            log.info("flushed %d batches", n)
            _pause_after_flush()
            units, rows = [], []
    if units:
        store.write(units, rows)
        _pause_after_flush()
    # Read back even what this run made, so a resumed and an uninterrupted run return rows
    # that went through the same types.
    return Mapped(
        units=[u for u, _ in store.units()],
        rows=store.read().to_pylist(),
        resumed_units=len(flushed),
        resumed_rows=resumed_rows,
    )

"""The flushed-parts store and the resumable map every long GPU stage runs on."""

import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pytest

from hic.parts import (
    PartStore,
    file_identity,
    model_identity,
    resumable_map,
    settings_identity,
)

SCHEMA = pa.schema([("unit", pa.string()), ("n", pa.int64()), ("value", pa.float64())])
UNITS = [f"u{i}" for i in range(10)]


class Killed(Exception):
    """Stands for SIGKILL: raised from the batch function."""


class Work:
    """A batch function that records the units it saw and dies at batch ``die_at``.

    Unit i yields i % 3 rows (so some units yield none), with values that depend on the unit
    alone."""

    def __init__(self, die_at: int | None = None):
        self.die_at, self.batches, self.seen = die_at, 0, []

    def __call__(self, batch):
        self.batches += 1
        if self.batches == self.die_at:
            raise Killed
        self.seen += batch
        return [
            [{"unit": u, "n": j, "value": int(u[1:]) / 7} for j in range(int(u[1:]) % 3)]
            for u in batch
        ]


def run(folder, work, fingerprint="job", schema=SCHEMA, flush_every=2, asked=None):
    def pending(done):
        if asked is not None:
            asked.append(set(done))
        return iter(UNITS)

    store = PartStore(folder, fingerprint, schema)
    return resumable_map(store, pending, lambda u: u, work, 2, flush_every)


def kill(folder, die_at=4, **kwargs):
    with pytest.raises(Killed):
        run(folder, Work(die_at), **kwargs)


def test_a_killed_map_resumes_without_redoing_a_flushed_unit(tmp_path):
    whole = run(tmp_path / "whole", Work())
    assert whole.units == UNITS and whole.resumed_units == 0
    assert [r["unit"] for r in whole.rows] == [u for u in UNITS for _ in range(int(u[1:]) % 3)]

    # Dies in batch 4: batches 1-2 were flushed together, batch 3 was lost with the job.
    kill(tmp_path / "killed")
    store = PartStore(tmp_path / "killed", "job", SCHEMA)
    assert [u for u, _ in store.units()] == UNITS[:4]
    assert store.units() == [("u0", 0), ("u1", 1), ("u2", 2), ("u3", 0)]

    # Flushing at another pace changes nothing but when parts are written.
    work, asked = Work(), []
    resumed = run(tmp_path / "killed", work, flush_every=3, asked=asked)
    assert asked == [set(UNITS[:4])]  # the caller can skip loading finished units
    assert work.seen == UNITS[4:]  # no flushed unit twice
    assert (resumed.resumed_units, resumed.resumed_rows) == (4, 3)
    assert resumed.units == whole.units and resumed.rows == whole.rows


def test_an_unfinished_run_leaves_whole_parts_only(tmp_path):
    kill(tmp_path, die_at=2, flush_every=1)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["manifest.json", "part-00000.parquet"]
    PartStore(tmp_path, "job", SCHEMA).remove()
    assert not tmp_path.exists()


@pytest.mark.parametrize(
    "change",
    [
        {"fingerprint": "another prompt"},
        {"schema": SCHEMA.append(pa.field("extra", pa.string()))},  # the code's rows changed
    ],
)
def test_parts_of_another_job_are_discarded(tmp_path, change):
    kill(tmp_path)
    work = Work()
    result = run(tmp_path, work, **change)
    assert work.seen == UNITS and result.resumed_units == 0


def test_a_torn_manifest_discards_the_parts(tmp_path):
    kill(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:15])  # a kill while it was written
    work = Work()
    assert run(tmp_path, work).resumed_units == 0 and work.seen == UNITS
    assert json.loads(manifest.read_text())["fingerprint"] == "job"


def test_a_batch_function_must_answer_for_every_unit(tmp_path):
    store = PartStore(tmp_path, "job", SCHEMA)
    with pytest.raises(ValueError, match="1 row lists for a batch of 2 units"):
        resumable_map(store, lambda done: UNITS, lambda u: u, lambda batch: [[]], 2, 1)


def test_file_identity_changes_when_a_file_is_rewritten(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"one")
    before = file_identity([path])
    os.utime(path, ns=(1, 1))
    assert file_identity([path]) != before
    assert file_identity([path])[0][:2] == [str(path), 3]


def test_model_identity_adds_a_local_folder_but_not_a_hub_id(tmp_path):
    (tmp_path / "tiny").mkdir()
    local = model_identity({"id": str(tmp_path / "tiny"), "revision": None})
    assert local["folder"] == file_identity([tmp_path / "tiny"])[0]
    assert model_identity({"id": "org/model", "revision": "abc"})["folder"] is None


def test_batch_size_is_no_part_of_the_settings_identity():
    @dataclass(frozen=True)
    class Settings:
        batch_size: int = 8
        max_new_tokens: int = 16

    assert settings_identity(Settings(batch_size=2)) == settings_identity(Settings())
    assert settings_identity(Settings(max_new_tokens=4)) != settings_identity(Settings())

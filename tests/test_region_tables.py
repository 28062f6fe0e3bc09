import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.region_tables import (
    PROPOSAL_SCHEMA,
    check_complete,
    image_groups,
    read_rows,
    write_groups,
)


def proposal(key, label):
    return {"key": key, "label": label, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5}


def write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=PROPOSAL_SCHEMA), path)


def test_image_groups_keep_an_image_together_across_batches(tmp_path):
    rows = [proposal("a", "x"), proposal("a", "y"), proposal("a", "z"), proposal("b", "x")]
    write(tmp_path / "p.parquet", [*rows, proposal("c", "w")])
    groups = list(image_groups(tmp_path / "p.parquet", batch_rows=2))
    assert [[r["label"] for r in g] for g in groups] == [["x", "y", "z"], ["x"], ["w"]]
    assert [g[0]["key"] for g in groups] == ["a", "b", "c"]


def test_image_groups_reject_an_image_split_by_another(tmp_path):
    write(tmp_path / "p.parquet", [proposal("a", "x"), proposal("b", "x"), proposal("a", "y")])
    with pytest.raises(ValueError, match="rows of image a are not together"):
        list(image_groups(tmp_path / "p.parquet"))


def test_write_groups_streams_row_groups_and_counts(tmp_path):
    groups = [[proposal("a", "x"), proposal("a", "y")], [], [proposal("c", "z")]]
    assert write_groups(iter(groups), PROPOSAL_SCHEMA, tmp_path / "o.parquet", 2) == (3, 3)
    assert pq.ParquetFile(tmp_path / "o.parquet").metadata.num_rows == 3
    assert [r["label"] for r in read_rows(tmp_path / "o.parquet")] == ["x", "y", "z"]
    assert pq.read_schema(tmp_path / "o.parquet") == PROPOSAL_SCHEMA


def test_write_groups_of_nothing_is_an_empty_table(tmp_path):
    assert write_groups([], PROPOSAL_SCHEMA, tmp_path / "o.parquet") == (0, 0)
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.num_rows == 0 and table.schema == PROPOSAL_SCHEMA


def test_check_complete_names_the_images_that_lost_regions():
    before = [{"key": "a"}, {"key": "b"}, {"key": "b"}]
    check_complete(before, [{"key": "a"}, {"key": "b"}, {"key": "b"}], "stage")
    with pytest.raises(
        RuntimeError, match=r"3 regions in, 1 out \(images without their regions: b\)"
    ):
        check_complete(before, [{"key": "a"}], "caption_regions")

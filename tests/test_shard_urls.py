from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.shard_urls import (
    REJECTED_SCHEMA,
    SHARD_SCHEMA,
    UrlListError,
    count_rows,
    resolve_columns,
    shard_count,
    shard_of,
    shard_url_lists,
)
from hic.url_keys import url_key


def read_shards(out: Path, n: int) -> list[pa.Table]:
    return [pq.read_table(out / f"{i:05d}.parquet") for i in range(n)]


def test_url_key_matches_duckdb_md5():
    urls = ["http://a.example/x.jpg", "https://b.example/ü?q=1&r=2", " http://c/ "]
    con = duckdb.connect()
    for url in urls:
        sql = con.execute("SELECT substr(md5(trim(?)), 1, 16)", [url]).fetchone()[0]
        assert url_key(url) == sql
    assert url_key(" http://c/ ") == url_key("http://c/")


def test_urls_differing_only_in_surrounding_whitespace_are_duplicates(tmp_path):
    urls = ["http://a/x.jpg", "http://a/x.jpg\t", "\n http://a/x.jpg\r\n", "http://a/y.jpg"]
    pq.write_table(pa.table({"url": urls}), tmp_path / "l.parquet")
    summary = shard_url_lists([tmp_path / "l.parquet"], tmp_path / "out", 1)
    kept = pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    assert sorted(r["url"] for r in kept) == ["http://a/x.jpg", "http://a/y.jpg"]
    assert all(r["key"] == url_key(r["url"]) for r in kept)
    assert summary["rejected"] == {"duplicate_url": 2}
    assert {url_key(u) for u in urls[:3]} == {url_key("http://a/x.jpg")}


def test_count_rows_formats(tmp_path):
    pq.write_table(pa.table({"url": ["a", "b", "c"]}), tmp_path / "l.parquet")
    (tmp_path / "l.csv").write_text("url,caption\nhttp://a,x\nhttp://b,y\n")
    (tmp_path / "l.tsv").write_text("url\tcaption\nhttp://a\tx\nhttp://b\ty")  # no final newline
    (tmp_path / "h.csv").write_text("url\n")
    assert count_rows(tmp_path / "l.parquet") == 3
    assert count_rows(tmp_path / "l.csv") == 2
    assert count_rows(tmp_path / "l.tsv") == 2
    assert count_rows(tmp_path / "h.csv") == 0
    with pytest.raises(UrlListError, match="unsupported URL list extension '.json'"):
        count_rows(tmp_path / "l.json")


def test_shard_count():
    assert shard_count(0, 10) == 1
    assert shard_count(10, 10) == 1
    assert shard_count(11, 10) == 2
    assert shard_count(12_000_000, 10_000) == 1200


def test_missing_url_column_names_file_and_columns(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"link": ["http://a"], "TEXT": ["x"]}), path)
    with pytest.raises(UrlListError) as err:
        shard_url_lists([path], tmp_path / "out", 1)
    assert str(path) in str(err.value) and "'link'" in str(err.value) and "'TEXT'" in str(err.value)


def test_resolve_columns_prefers_first_candidate():
    cols = resolve_columns(
        ["URL", "url", "TEXT"],
        {"url": ["url", "URL"], "caption": ["TEXT"], "width": ["WIDTH"]},
        Path("x"),
    )
    assert cols == {"url": "url", "caption": "TEXT", "width": None}


def test_every_row_is_sharded_or_rejected_with_a_reason(tmp_path):
    a = tmp_path / "a.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": [
                    "http://x/1.jpg",
                    "",
                    None,
                    "ftp://x/2.jpg",
                    "x/3.jpg",
                    " http://x/1.jpg",
                    "HTTPS://x/4.jpg",
                ],
                "TEXT": ["first", "empty", "null", "ftp", "relative", "dup", "upper"],
                "WIDTH": [10, 20, 30, 40, 50, 60, 70],
            }
        ),
        a,
    )
    b = tmp_path / "b.tsv"
    b.write_text(
        "url\tcaption\theight\nhttp://x/5.jpg\tfive\tnot-a-number\nhttp://x/1.jpg\tdup2\t3\n"
    )
    out = tmp_path / "out"
    summary = shard_url_lists([a, b], out, 3)

    shards = read_shards(out, 3)
    rejected = pq.read_table(out / "rejected.parquet")
    assert all(t.schema == SHARD_SCHEMA for t in shards)
    assert rejected.schema == REJECTED_SCHEMA
    kept = pa.concat_tables(shards).to_pylist()
    assert sorted(r["caption"] for r in kept) == ["first", "five", "upper"]
    reasons = {r["caption"]: r["reason"] for r in rejected.to_pylist()}
    assert reasons == {
        "empty": "empty_url",
        "null": "empty_url",
        "ftp": "unsupported_scheme",
        "relative": "no_scheme",
        "dup": "duplicate_url",
        "dup2": "duplicate_url",
    }
    dup = [r for r in rejected.to_pylist() if r["caption"] == "dup2"][0]
    assert dup["duplicate_of"] == url_key("http://x/1.jpg") and dup["source_row"] == 1
    assert summary["input_rows"] == 9 == len(kept) + rejected.num_rows
    assert summary["rejected"] == {
        "duplicate_url": 2,
        "empty_url": 2,
        "no_scheme": 1,
        "unsupported_scheme": 1,
    }
    five = [r for r in kept if r["caption"] == "five"][0]
    assert five["height"] is None and five["width"] is None  # bad number -> null, row kept


def test_keys_and_shards_are_stable_and_hash_assigned(tmp_path):
    urls = [f"http://img.example/{i}.jpg" for i in range(200)]
    path = tmp_path / "l.csv"
    path.write_text("url,caption\n" + "".join(f'{u},"cap, {i}"\n' for i, u in enumerate(urls)))
    shard_url_lists([path], tmp_path / "o1", 4)
    shards = read_shards(tmp_path / "o1", 4)
    for i, table in enumerate(shards):
        for row in table.to_pylist():
            assert row["key"] == url_key(row["url"]) and shard_of(row["key"], 4) == i
            assert row["caption"] == f"cap, {row['source_row']}"
        rows = table.column("source_row").to_pylist()
        assert rows == sorted(rows)  # input order within a shard
    assert sum(t.num_rows for t in shards) == 200

    # The same URLs in another order get the same keys and shards.
    reordered = tmp_path / "r.parquet"
    pq.write_table(pa.table({"url": urls[::-1]}), reordered)
    shard_url_lists([reordered], tmp_path / "o2", 4)
    again = read_shards(tmp_path / "o2", 4)
    for first, second in zip(shards, again, strict=True):
        assert set(first.column("key").to_pylist()) == set(second.column("key").to_pylist())


def test_empty_shards_are_written_with_schema(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": ["http://only/one.jpg"]}), path)
    summary = shard_url_lists([path], tmp_path / "out", 5, temp_dir=tmp_path / "tmp")
    shards = read_shards(tmp_path / "out", 5)
    assert [t.num_rows for t in shards].count(0) == 4
    assert all(t.schema == SHARD_SCHEMA for t in shards)
    assert summary["shard_rows_min"] == 0 and summary["shard_rows_max"] == 1
    assert not (tmp_path / "tmp" / "shard_urls.duckdb").exists()


def test_missing_list_is_named(tmp_path):
    with pytest.raises(UrlListError, match="nope.parquet: URL list not found"):
        shard_url_lists([tmp_path / "nope.parquet"], tmp_path / "out", 1)


def test_scheme_is_read_before_the_first_colon(tmp_path):
    path = tmp_path / "l.parquet"
    urls = ["file:results/demo/a.jpg", "FILE:///abs/b.jpg", "http://x/c.jpg", "c:d", "no/scheme"]
    pq.write_table(pa.table({"url": urls}), path)
    summary = shard_url_lists([path], tmp_path / "out", 1, schemes=["file", "http"])
    kept = pq.read_table(tmp_path / "out/00000.parquet").column("url").to_pylist()
    assert kept == urls[:3]
    assert summary["rejected"] == {"no_scheme": 1, "unsupported_scheme": 1}


def test_malformed_text_rows_are_rejected_with_their_line(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text('url\tcaption\nhttp://a/1.jpg\tok\nhttp://a/2.jpg\t"lone quote\n')
    csv_list = tmp_path / "b.csv"
    csv_list.write_text(
        'url,caption\nhttp://b/1.jpg,"fine, quoted"\nhttp://b/2.jpg,"bad "quote" x,extra\n'
        "http://b/3.jpg\nhttp://b/4.jpg,last\n"
    )
    summary = shard_url_lists([tsv, csv_list], tmp_path / "out", 1)
    kept = pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    captions = {r["url"]: r["caption"] for r in kept}
    assert captions == {
        "http://a/1.jpg": "ok",
        "http://a/2.jpg": '"lone quote',  # tsv has no quoting
        "http://b/1.jpg": "fine, quoted",
        "http://b/4.jpg": "last",
    }
    rejected = pq.read_table(tmp_path / "out/rejected.parquet").to_pylist()
    assert [(r["reason"], r["caption"]) for r in rejected] == [
        ("unparseable_row", 'line 3: http://b/2.jpg,"bad "quote" x,extra'),
        ("unparseable_row", "line 4: http://b/3.jpg"),
    ]
    assert summary["input_rows"] == 6 and summary["rejected"] == {"unparseable_row": 2}


def test_a_corrupt_parquet_list_is_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UrlListError, match="broken.parquet: not a readable parquet file"):
        count_rows(bad)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.download import STATUS_SCHEMA
from hic.stats import download_stats, plot_distributions, plot_status, summary_markdown

QUANTILES = [0.0, 0.5, 1.0]


def shard(path, rows):
    cols = {name: [r.get(name) for r in rows] for name in STATUS_SCHEMA.names}
    pq.write_table(pa.table(cols, schema=STATUS_SCHEMA), path)
    return path


def ok(key, w, h, words):
    return {
        "key": key,
        "status": "success",
        "width": w,
        "height": h,
        "original_width": 2 * w,
        "original_height": 2 * h,
        "caption_words": words,
    }


def failed(key, status, etype, words=0):
    return {
        "key": key,
        "status": status,
        "error_type": etype,
        "error_message": f"msg {etype}",
        "caption_words": words,
    }


@pytest.fixture
def files(tmp_path):
    return [
        shard(
            tmp_path / "00000.parquet",
            [
                ok("a", 100, 50, 3),
                ok("b", 200, 100, 5),
                failed("c", "failed_to_download", "http_404", 1),
            ],
        ),
        shard(
            tmp_path / "00001.parquet",
            [
                ok("d", 300, 150, 0),
                failed("e", "failed_to_download", "http_404"),
                failed("f", "failed_to_resize", "decode_error", 9),
            ],
        ),
        shard(tmp_path / "00002.parquet", []),  # an empty shard (all rows rejected upstream)
    ]


def test_download_stats_counts_and_exact_quantiles(files):
    t = download_stats(files, quantiles=QUANTILES, top_errors=5)
    status = dict(zip(t["status"]["status"], t["status"]["count"], strict=True))
    assert status == {"success": 3, "failed_to_download": 2, "failed_to_resize": 1}
    assert t["status"]["fraction"].sum() == pytest.approx(1.0, abs=1e-3)
    errors = t["errors"].set_index("error_type")
    assert errors.loc["http_404", "count"] == 2 and errors.loc["decode_error", "count"] == 1
    assert errors.loc["http_404", "fraction_of_failures"] == pytest.approx(2 / 3, abs=1e-3)
    sizes = t["image_sizes"].set_index("measure")
    assert list(sizes.loc["width", ["n", "min", "q0.5", "max"]]) == [3, 100, 200, 300]
    assert sizes.loc["original_height", "q0.5"] == 200
    words = t["alt_text_words"].iloc[0]
    assert (words["n"], words["min"], words["q0.5"], words["max"]) == (6, 0, 1, 9)
    hist = dict(
        zip(
            t["alt_text_words_histogram"]["words"],
            t["alt_text_words_histogram"]["count"],
            strict=True,
        )
    )
    assert hist == {0: 2, 1: 1, 3: 1, 5: 1, 9: 1}


def test_top_errors_folds_the_rest_into_one_row(files):
    errors = download_stats(files, quantiles=QUANTILES, top_errors=1)["errors"]
    assert errors["error_type"].tolist() == ["http_404", "other (1 types)"]
    assert errors["count"].tolist() == [2, 1]  # every failure is still counted


def test_summary_and_plots(files, tmp_path):
    t = download_stats(files, quantiles=QUANTILES, top_errors=5)
    md = summary_markdown(t, {"input_rows": 8, "n_shards": 3, "rejected": {"duplicate_url": 2}})
    assert "URL rows read: 8; rejected before download: 2 (duplicate_url: 2)" in md
    assert "Downloaded: 3 (50.0%)" in md and "| http_404" in md
    plot_status(t, tmp_path / "s.png")
    plot_distributions(t, tmp_path / "d.png", bins=10)
    for name in ["s.png", "d.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

import json
import math
from pathlib import Path

import pytest

from hic.tables import (
    REFERENCE_COLUMNS,
    RESULT_COLUMNS,
    ResultError,
    classification_table,
    load_reference,
    load_results,
    long_csv,
    plot_retrieval,
    retrieval_table,
    run_rows,
    to_latex,
    to_markdown,
)

REPO_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference_results.csv"


def recalls(r1):
    return {"R@1": r1, "R@5": r1 + 0.1, "R@10": r1 + 0.2}


def retrieval(run, benchmark, i2t, t2i):
    return {
        "run": run,
        "benchmark": benchmark,
        "task": "retrieval",
        "n": 100,
        "image_to_text": recalls(i2t),
        "text_to_image": recalls(t2i),
        "protocol": {"prompt": "none"},
    }


def classification(run, benchmark, top1, top5):
    return {
        "run": run,
        "benchmark": benchmark,
        "task": "classification",
        "n": 180,
        "top1": top1,
        "top5": top5,
        "protocol": {},
    }


def write(tmp_path, results):
    paths = []
    for r in results:
        path = tmp_path / "eval" / r["run"] / f"{r['benchmark']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
        paths.append(path)
    return paths


RUNS = {
    "long": {"policy": "long", "annotations": "reference"},
    "alt_text": {"policy": "alt", "annotations": "reference"},
    "flair_hier": {"method": "flair", "policy": "hierarchical", "annotations": "dataset"},
}


@pytest.fixture
def results(tmp_path):
    # "long" appears first in the files; "urban" before "demo"; flair after the clip runs.
    return load_results(
        write(
            tmp_path,
            [
                retrieval("long", "urban", 0.333, 0.25),
                retrieval("long", "demo", 0.12, 0.5),
                retrieval("alt_text", "urban", 0.4, 0.125),
                retrieval("alt_text", "demo", 0.12, 0.3),
                retrieval("flair_hier", "urban", 0.1, 0.2),
                retrieval("flair_hier", "demo", 0.05, 0.1),
                classification("long", "demo_classify", 0.3, 0.7),
                classification("alt_text", "demo_classify", 0.25, 0.655),
            ],
        ),
        run_rows(RUNS),
    )


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text(
        "# a comment line, skipped\n"
        "method,data,benchmark,direction,metric,value,source\n"
        "flair,PixelProse,urban,I→T,R@1,90.0,Paper (2024) Table 9 #2\n"
        "flair,PixelProse,urban,T→I,R@1,80.5,Paper (2024) Table 9\n"
        "flair,PixelProse,urban,I→T,R@5,99.0,Paper (2024) Table 9\n"
        "flair,PixelProse,dci,T→I,R@1,60.0,Paper (2024) Table 9\n"
        "flair,PixelProse,demo_classify,,top1,77.7,Paper (2024) Table 3\n"
        "cosmos,CC3M,elsewhere,I→T,R@1,50.0,Other (2023) Table 1\n"
    )
    return load_reference(path)


CLIP_LONG = ("clip", "run", "long captions (reference)")
CLIP_ALT = ("clip", "run", "alt-text")
FLAIR_RUN = ("flair", "run", "HIC captions (this pipeline)")
FLAIR_PUBLISHED = ("flair", "published", "PixelProse")


def test_load_results_long_format(results):
    assert list(results.columns) == RESULT_COLUMNS
    assert len(results) == 6 * 6 + 2 * 2
    row = results[
        (results["run"] == "long")
        & (results["benchmark"] == "demo")
        & (results["direction"] == "T→I")
        & (results["metric"] == "R@5")
    ]
    assert row["value"].item() == pytest.approx(0.6)
    assert row["n"].item() == 100
    assert row[["method", "data"]].values.tolist() == [["clip", "long captions (reference)"]]


def test_run_rows_name_method_and_data_and_refuse_twins():
    assert run_rows(RUNS)["flair_hier"] == ("flair", "HIC captions (this pipeline)")
    assert run_rows({"x": {"policy": "alt", "label": "LAION-400M"}}) == {
        "x": ("clip", "LAION-400M")
    }
    with pytest.raises(ValueError, match="runs 'a' and 'b' are both method 'clip' on 'alt-text'"):
        run_rows({"a": {"policy": "alt"}, "b": {"policy": "alt", "annotations": "dataset"}})


def test_retrieval_table_values_and_order(results):
    table = retrieval_table(results)
    assert list(table.columns) == [
        ("urban", "I→T"),
        ("urban", "T→I"),
        ("demo", "I→T"),
        ("demo", "T→I"),
    ]
    assert list(table.index) == [CLIP_LONG, CLIP_ALT, FLAIR_RUN]
    assert table.loc[CLIP_LONG, ("urban", "I→T")] == 33.3
    assert table.loc[CLIP_ALT, ("urban", "T→I")] == 12.5
    assert table.loc[CLIP_LONG, ("demo", "T→I")] == 50.0
    assert table.attrs["metric"] == "R@1"


def test_retrieval_table_selection_and_recall(results):
    table = retrieval_table(results, benchmarks=["demo", "urban"], recall="R@10")
    assert list(table.columns.get_level_values(0)) == ["demo", "demo", "urban", "urban"]
    assert list(table.columns.get_level_values(1)) == ["I→T", "T→I", "I→T", "T→I"]
    assert table.loc[CLIP_ALT, ("demo", "T→I")] == 50.0
    only = retrieval_table(results, benchmarks=["demo"])
    assert only.shape == (3, 2)


def test_retrieval_table_rejects_unknown_names(results):
    with pytest.raises(ValueError, match="coco"):
        retrieval_table(results, benchmarks=["coco"])
    with pytest.raises(ValueError, match="R@2"):
        retrieval_table(results, recall="R@2")


def test_published_rows_lead_their_method_and_keep_the_papers_columns(results, reference):
    table = retrieval_table(results, reference=reference)
    # cosmos has no number on these benchmarks ("elsewhere" is not one of the paper's), so
    # it gets no row; dci has a published number only, and still gets its columns.
    assert list(table.index) == [CLIP_LONG, CLIP_ALT, FLAIR_PUBLISHED, FLAIR_RUN]
    assert list(table.columns.get_level_values(0)) == ["urban"] * 2 + ["demo"] * 2 + ["dci"] * 2
    assert table.loc[FLAIR_PUBLISHED, ("urban", "T→I")] == 80.5
    assert table.loc[FLAIR_PUBLISHED, ("dci", "T→I")] == 60.0
    assert math.isnan(table.loc[FLAIR_PUBLISHED, ("demo", "I→T")])
    assert math.isnan(table.loc[FLAIR_RUN, ("dci", "T→I")])
    r5 = retrieval_table(results, recall="R@5", reference=reference)
    assert r5.loc[FLAIR_PUBLISHED, ("urban", "I→T")] == 99.0


def test_classification_table(results, reference):
    table = classification_table(results[results["task"] == "classification"])
    assert list(table.columns) == [("demo_classify", "top1"), ("demo_classify", "top5")]
    assert list(table.index) == [CLIP_LONG, CLIP_ALT]
    assert table.loc[CLIP_ALT, ("demo_classify", "top5")] == 65.5
    with_ref = classification_table(
        results[results["task"] == "classification"], reference=reference
    )
    assert with_ref.loc[FLAIR_PUBLISHED, ("demo_classify", "top1")] == 77.7
    assert math.isnan(with_ref.loc[FLAIR_PUBLISHED, ("demo_classify", "top5")])


def test_latex_bold_best_among_runs_in_method_blocks(results, reference):
    table = retrieval_table(results, reference=reference, benchmarks=["urban", "demo"])
    tex = to_latex(table, "Recall@1.", "tab:r1")
    lines = tex.splitlines()
    for command in [r"\toprule", r"\bottomrule", r"\caption{Recall@1.}", r"\label{tab:r1}"]:
        assert command in lines
    assert r" & R@1 & \multicolumn{2}{c}{urban} & \multicolumn{2}{c}{demo} \\" in lines
    arrows = r"I$\rightarrow$T & T$\rightarrow$I & I$\rightarrow$T & T$\rightarrow$I \\"
    assert "Method & Data & " + arrows in lines
    # The published row beats every run but is never bold; the demo I→T tie bolds both runs.
    published = r"flair & PixelProse (published) & 90.0 & 80.5 & -- & -- \\"
    long = r"clip & long captions (reference) & 33.3 & \textbf{25.0} & \textbf{12.0} & "
    long += r"\textbf{50.0} \\"
    assert published in lines and long in lines
    assert r"clip & alt-text & \textbf{40.0} & 12.5 & \textbf{12.0} & 30.0 \\" in lines
    # A rule opens each method's block.
    assert lines[lines.index(published) - 1] == r"\midrule"
    assert lines[lines.index(long) - 1] == r"\midrule"
    assert tex.count(r"\midrule") == 2


def test_markdown_headers(results, reference):
    md = to_markdown(retrieval_table(results, reference=reference))
    header = md.splitlines()[0]
    for name in ["method", "training data", "urban I→T", "urban T→I", "demo I→T", "dci T→I"]:
        assert name in header
    assert "PixelProse (published)" in md and "HIC captions (this pipeline)" in md
    assert "nan" not in md and "–" in md
    assert "33.3" in md


def test_csv_is_long_with_every_recall_and_the_sources(results, reference):
    frame = long_csv(results, reference, "retrieval")
    assert set(frame["metric"]) == {"R@1", "R@5", "R@10"}
    run = frame[(frame["run"] == "long") & (frame["benchmark"] == "urban")]
    assert run.query("direction == 'I→T' and metric == 'R@5'")["value"].item() == 43.3
    published = frame[frame["kind"] == "published"]
    assert len(published) == 5 and (published["source"] != "").all()
    classes = long_csv(results, reference, "classification")
    assert set(classes["metric"]) == {"top1", "top5"} and len(classes) == 2 * 2 + 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"run": "a", "task": "retrieval", "n": 1}), "benchmark"),
        (json.dumps({**retrieval("a", "b", 0.1, 0.2), "text_to_image": {"R@1": 0.1}}), "R@10"),
        (json.dumps(retrieval("a", "b", 12.0, 0.2)), "fraction"),
        (json.dumps({**classification("a", "b", 0.1, 0.2), "task": "vqa"}), "unknown task"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_malformed_result_names_file(tmp_path, content, message):
    good = write(tmp_path, [retrieval("ok", "demo", 0.1, 0.2)])
    bad = tmp_path / "eval" / "broken" / "demo.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    with pytest.raises(ResultError, match=message) as err:
        load_results([*good, bad])
    assert str(bad) in str(err.value)


def test_duplicate_result_names_both_files(tmp_path):
    first = write(tmp_path, [retrieval("a", "demo", 0.1, 0.2)])
    second = tmp_path / "copy.json"
    second.write_text(first[0].read_text())
    with pytest.raises(ResultError) as err:
        load_results([*first, second])
    assert str(first[0]) in str(err.value) and str(second) in str(err.value)


def test_reference_file_in_repo_loads_and_cites():
    ref = load_reference(REPO_REFERENCE)
    assert list(ref.columns) == REFERENCE_COLUMNS
    assert (ref["source"].str.len() > 0).all()


@pytest.mark.parametrize(
    "row, message",
    [
        ("M,D,urban,I→T,R@1,50.0,", "source"),
        ("M,D,urban,I2T,R@1,50.0,Paper Table 1", "direction"),
        ("M,D,urban,I→T,R@1,0.5x,Paper Table 1", "percentage"),
    ],
)
def test_reference_rejects_bad_rows(tmp_path, row, message):
    path = tmp_path / "ref.csv"
    path.write_text("method,data,benchmark,direction,metric,value,source\n" + row + "\n")
    with pytest.raises(ResultError, match=message) as err:
        load_reference(path)
    assert str(path) in str(err.value)


def test_plot_writes_png(results, reference, tmp_path):
    path = tmp_path / "retrieval.png"
    plot_retrieval(retrieval_table(results, reference=reference), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
